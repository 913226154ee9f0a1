"""A local stand-in for the Harvard Dataverse record of HAM10000 (doi:10.7910/DVN/DBW86T), for tests of
:mod:`core.download` that must not touch the network.

It answers the API's real paths with the real JSON shapes: ``GET /api/datasets/:persistentId/?persistentId=…``
(``data.latestVersion`` with ``license``, ``files``: ``[{label, restricted, version, dataFile: {id, filename,
filesize, checksum: {type, value}, …}}]``), ``GET /api/datasets/:persistentId/versions/:latest/files`` and
``GET /api/access/datafile/{id}`` (``?format=original`` for an ingested table, whose listed ``filename`` is
``<stem>.tab`` and whose checksum is that of the original, as Dataverse does; ``Range: bytes=N-`` answered with 206).
Faults are switched on per test through the attributes: ``cut``, ``html``, ``status``, ``stall``, ``corrupt``,
``ignore_range``, ``redirect``, ``inline_files``; every request is logged in ``requests``.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

DOI = "doi:10.7910/DVN/DBW86T"


@dataclass
class FakeFile:
    name: str           # as uploaded (for a table: the original's name)
    content: bytes
    tabular: bool = False

    @property
    def archival(self) -> bytes:
        """What Dataverse serves for an ingested table without ``format=original``: tab-separated, quoted."""
        lines = self.content.decode().splitlines()
        return ("\n".join("\t".join(f'"{v}"' for v in line.split(",")) for line in lines) + "\n").encode()


class FakeDataverse:
    def __init__(self, files: list[FakeFile], version: int = 4) -> None:
        self.files = {1000 + i: f for i, f in enumerate(files)}
        self.version = version
        self.license: dict | str | None = {"name": "CC BY-NC-SA 4.0",
                                           "uri": "http://creativecommons.org/licenses/by-nc-sa/4.0"}
        self.inline_files = True                # False: the dataset JSON has no files; the listing endpoint has them
        self.cut: dict[str, int] = {}           # name → how many more requests to cut after half the body
        self.html: set[str] = set()             # names answered with a guestbook-like HTML page
        self.status: dict[str, int] = {}        # name → HTTP error status
        self.stall: set[str] = set()            # names whose body never comes
        self.corrupt: set[str] = set()          # names served with the right size, wrong bytes
        self.ignore_range = False
        self.redirect = False                   # True: the data-access API answers 303 to a storage URL, as Harvard's
        self.requests: list[dict] = []
        self._release = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> FakeDataverse:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def remove(self, name: str) -> None:
        self.files = {i: f for i, f in self.files.items() if f.name != name}

    def entry(self, file_id: int) -> dict:
        f = self.files[file_id]
        data = {"id": file_id, "persistentId": "", "filename": f.name, "contentType": "application/zip",
                "filesize": len(f.content), "storageIdentifier": f"s3://dvn-cloud:{file_id:x}", "rootDataFileId": -1,
                "md5": hashlib.md5(f.content).hexdigest(),
                "checksum": {"type": "MD5", "value": hashlib.md5(f.content).hexdigest()}, "creationDate": "2018-06-01"}
        if f.tabular:
            stem = f.name.rsplit(".", 1)[0]
            data.update(filename=f"{stem}.tab", contentType="text/tab-separated-values", filesize=len(f.archival),
                        originalFileFormat="text/csv", originalFormatLabel="Comma Separated Values",
                        originalFileSize=len(f.content), originalFileName=f.name, UNF="UNF:6:AAAA==", tabularData=True)
        return {"description": "", "label": data["filename"], "restricted": False, "version": 1,
                "datasetVersionId": 200 + self.version, "dataFile": data}

    def dataset_json(self) -> dict:
        latest = {"id": 200 + self.version, "datasetId": 3172583, "datasetPersistentId": DOI,
                  "storageIdentifier": "s3://10.7910/DVN/DBW86T", "versionNumber": self.version,
                  "versionMinorNumber": 0, "versionState": "RELEASED", "lastUpdateTime": "2023-01-01T00:00:00Z",
                  "releaseTime": "2023-01-01T00:00:00Z", "createTime": "2018-06-01T00:00:00Z",
                  "fileAccessRequest": False, "metadataBlocks": {"citation": {"displayName": "Citation Metadata",
                                                                              "fields": []}}}
        if self.license is not None:
            latest["license"] = self.license
        if self.inline_files:
            latest["files"] = [self.entry(i) for i in self.files]
        return {"status": "OK", "data": {"id": 3172583, "identifier": "DVN/DBW86T", "protocol": "doi",
                                         "authority": "10.7910", "persistentUrl": "https://doi.org/10.7910/DVN/DBW86T",
                                         "publisher": "Harvard Dataverse", "latestVersion": latest}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def send(self, status: int, body: bytes, ctype: str = "application/json", **headers) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(headers.pop("length", len(body))))
                for key, value in headers.items():
                    self.send_header(key.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(body)

            def error(self, status: int, message: str) -> None:
                self.send(status, json.dumps({"status": "ERROR", "message": message}).encode())

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                fake.requests.append({"path": url.path, "query": query, "range": self.headers.get("Range")})
                if url.path.startswith("/api/datasets/:persistentId"):
                    if query.get("persistentId") != DOI:
                        return self.error(404, f"Dataset with Persistent ID {query.get('persistentId')} not found.")
                    if url.path.rstrip("/") == "/api/datasets/:persistentId":
                        return self.send(200, json.dumps(fake.dataset_json()).encode())
                    if url.path == "/api/datasets/:persistentId/versions/:latest/files":
                        files = [fake.entry(i) for i in fake.files]
                        return self.send(200, json.dumps({"status": "OK", "totalCount": len(files),
                                                          "data": files}).encode())
                if url.path.startswith("/api/access/datafile/") and fake.redirect:
                    self.send_response(303)
                    self.send_header("Location", f"/s3/{url.path.rsplit('/', 1)[1]}?{url.query}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if url.path.startswith(("/api/access/datafile/", "/s3/")):
                    return self.datafile(int(url.path.rsplit("/", 1)[1]), query)
                self.error(404, "API endpoint does not exist on this server")

            def datafile(self, file_id: int, query: dict) -> None:
                if file_id not in fake.files:
                    return self.error(404, f"File not found for given id ({file_id}).")
                f = fake.files[file_id]
                if f.name in fake.status:
                    return self.error(fake.status[f.name], "Forbidden")
                if f.name in fake.html:
                    page = b"<!DOCTYPE html>\n<html><body><h1>Guestbook</h1>Please accept the terms.</body></html>"
                    return self.send(200, page, "text/html;charset=UTF-8")
                body = f.archival if f.tabular and query.get("format") != "original" else f.content
                if f.name in fake.corrupt:
                    body = bytes(len(body))
                start = 0
                if (spec := self.headers.get("Range")) and not fake.ignore_range:
                    start = int(spec.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        return self.error(416, "Requested Range Not Satisfiable")
                status, extra = (206, {"Content_Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}) if start \
                    else (200, {})
                rest = body[start:]
                if f.name in fake.stall:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(rest)))
                    self.end_headers()
                    self.wfile.flush()
                    fake._release.wait(10)
                    return
                if fake.cut.get(f.name, 0) > 0:  # announce it all, send half, hang up
                    fake.cut[f.name] -= 1
                    self.close_connection = True
                    return self.send(status, rest[:len(rest) // 2], "application/zip", length=len(rest), **extra)
                self.send(status, rest, "application/zip", **extra)

        return Handler
