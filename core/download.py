"""``train.py download``: HAM10000 or the ISIC 2018 Task 3 test set from Harvard Dataverse, verified and unpacked.

The record (doi:10.7910/DVN/DBW86T) is listed with the native API (``GET /api/datasets/:persistentId/?persistentId=…``
→ ``data.latestVersion.files``) and each file fetched with the data-access API (``GET /api/access/datafile/{id}``,
``?format=original`` for a table Dataverse ingested into ``.tab``: its ``checksum`` is that of the original). Files are
staged in a hidden sibling of the destination, resumed with HTTP Range, checked against the record's size and checksum,
unpacked into the layout :mod:`core.data` reads and renamed into place only when all of that worked, with
``.complete.json``: an interrupted download never leaves a folder that looks complete.

Verified (Dataverse guides and source; public scripts that fetch this record by file id): the API paths, the file-entry
JSON (``dataFile.id/filename/filesize/checksum{type,value}``, ``originalFileName/originalFileFormat/originalFileSize``
for ingested tables) and the record's file names: ``HAM10000_images_part_1.zip``, ``…_part_2.zip``,
``HAM10000_metadata``, ``HAM10000_segmentations_lesion_tschandl.zip``, ``ISIC2018_Task3_Test_Images.zip`` (1511
images), ``ISIC2018_Task3_Test_GroundTruth.csv``. Assumed, and handled either way: whether the two tables are ingested,
their delimiter (sniffed), the ground truth's schema (HAM10000 columns or the challenge's one-hot form); that the files
need no guestbook (an HTML answer is refused with a message); the licence when the record's JSON does not state one.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from core.data import PROJECT_ROOT, DataError
from core.unpack import unpack

DOI = "doi:10.7910/DVN/DBW86T"
RECORD_URL = "https://doi.org/10.7910/DVN/DBW86T"
DEFAULT_SERVER = "https://dataverse.harvard.edu"
DEFAULT_TIMEOUT = 30.0          # seconds to connect, and the longest silence while reading
RETRIES = 2                     # further tries of one file after a cut connection, a time-out or a 5xx
BACKOFF_S = 2.0                 # wait before retry k: BACKOFF_S * 2**k
CHUNK = 1 << 20
MARKER = ".complete.json"
USER_AGENT = "melanoma-workbench/0.1 (train.py download; python-urllib)"
KNOWN_LICENSE = "CC BY-NC-SA 4.0 (https://creativecommons.org/licenses/by-nc-sa/4.0/)"
HAM_CITATION = ("Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of multi-source "
                "dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018), "
                "doi:10.1038/sdata.2018.161")
ISIC2018_CITATION = ("Codella N. et al. Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge Hosted by "
                     "the International Skin Imaging Collaboration (ISIC). arXiv:1902.03368 (2019)")
HASHES = {"MD5": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}   # Dataverse's checksum.type, sans '-'
ORIGINAL_EXTENSIONS = {"text/csv": ".csv", "text/tab-separated-values": ".tsv", "text/plain": ".txt"}


class DownloadError(DataError):
    """A download that could not be completed or verified; the message names the file, the problem and the way out."""


@dataclass(frozen=True)
class DatasetSpec:
    default_dir: str                       # relative to the project
    files: tuple[tuple[str, str], ...]     # (name as published, role: images | masks | metadata | labels)
    citations: tuple[str, ...]


DATASETS = {
    "ham10000": DatasetSpec("data/ham10000", (
        ("HAM10000_images_part_1.zip", "images"), ("HAM10000_images_part_2.zip", "images"),
        ("HAM10000_metadata", "metadata"), ("HAM10000_segmentations_lesion_tschandl.zip", "masks")), (HAM_CITATION,)),
    "isic2018-test": DatasetSpec("data/isic2018_test", (
        ("ISIC2018_Task3_Test_Images.zip", "images"), ("ISIC2018_Task3_Test_GroundTruth", "labels")),
        (HAM_CITATION, ISIC2018_CITATION)),
}


@dataclass(frozen=True)
class RemoteFile:
    """One file of the record as it will be downloaded (for an ingested table: its saved original)."""
    id: int
    name: str
    size: int | None
    checksum_type: str | None
    checksum: str | None
    original: bool = False

    def url(self, server: str) -> str:
        return f"{server}/api/access/datafile/{self.id}" + ("?format=original" if self.original else "")

    @classmethod
    def from_entry(cls, entry: dict) -> RemoteFile:
        data = entry.get("dataFile", entry)
        name = data.get("filename") or entry.get("label") or str(data["id"])
        original = bool(data.get("originalFileFormat")) and name.endswith(".tab")
        if original:
            name = data.get("originalFileName") or name[:-4] + ORIGINAL_EXTENSIONS.get(data["originalFileFormat"], "")
        checksum = data.get("checksum") or ({"type": "MD5", "value": data["md5"]} if data.get("md5") else {})
        return cls(int(data["id"]), PurePosixPath(name).name, data.get("originalFileSize" if original else "filesize"),
                   checksum.get("type"), checksum.get("value"), original)


def _norm(name: str) -> str:
    """Compare names by stem, ignoring case, separators and extension: ``HAM10000_images_part1.zip`` (as the record's
    description spells it) finds ``HAM10000_images_part_1.zip``, and ``HAM10000_metadata`` its ``.tab``/``.csv``."""
    return re.sub(r"[^a-z0-9]", "", re.sub(r"\.(zip|csv|tab|tsv|txt)$", "", name.lower()))


def _open(url: str, timeout: float, offset: int = 0) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={offset}-"} if offset else {})}
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _reason(err: BaseException, timeout: float) -> str:
    err = getattr(err, "reason", err) if isinstance(err, urllib.error.URLError) else err
    if isinstance(err, str):
        return err
    if isinstance(err, TimeoutError):
        return f"no answer from the server for {timeout:g} s (time-out)"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def fetch_record(server: str = DEFAULT_SERVER, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """The record's latest version (``data.latestVersion``) with its ``files``, from the native API."""
    query = urllib.parse.urlencode({"persistentId": DOI})
    version = _get_json(f"{server}/api/datasets/:persistentId/?{query}", server, timeout).get("latestVersion", {})
    if "files" not in version:  # some installations leave them out: the dedicated listing has them
        version["files"] = _get_json(f"{server}/api/datasets/:persistentId/versions/:latest/files?{query}", server,
                                     timeout)
    return version


def _get_json(url: str, server: str, timeout: float):
    try:
        with _open(url, timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"the record {DOI} on {server}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise DownloadError(f"could not reach {server} ({_reason(err, timeout)}); are you offline?") from err
    except ValueError as err:
        raise DownloadError(f"the record {DOI} on {server}: the answer is not JSON (a maintenance page?)") from err
    if body.get("status") != "OK" or "data" not in body:
        raise DownloadError(f"the record {DOI} on {server}: {body.get('message', 'unexpected answer')}")
    return body["data"]


def match_files(version: dict, spec: DatasetSpec) -> list[tuple[RemoteFile, str]]:
    """The record's file for each wanted name, found by stem; a missing one is an error listing what the record has."""
    files = [RemoteFile.from_entry(entry) for entry in version.get("files", [])]
    found = []
    for wanted, role in spec.files:
        hits = [f for f in files if _norm(f.name) == _norm(wanted)]
        if not hits:
            have = ", ".join(sorted(f.name for f in files)) or "no files"
            raise DownloadError(f"{wanted} is not in the record {DOI} (version {_version(version)}); it has: {have}")
        found.append((hits[0], role))
    return found


def _version(version: dict) -> str:
    return f"{version.get('versionNumber', '?')}.{version.get('versionMinorNumber', 0)}"


def _print_terms(version: dict, spec: DatasetSpec, out: Callable[[str], None]) -> None:
    """The licence and what to cite, before anything is downloaded: the data may not be used without them."""
    licence = version.get("license")
    if isinstance(licence, dict):
        terms = f"{licence.get('name', '')} ({licence.get('uri', '')})".replace(" ()", "")
    elif isinstance(licence, str) and licence not in ("", "NONE"):
        terms = licence
    elif version.get("termsOfUse"):
        terms = " ".join(re.sub(r"<[^>]+>", " ", version["termsOfUse"]).split())[:400]
    else:
        terms = KNOWN_LICENSE
    out(f"Record {RECORD_URL} (version {_version(version)}). Licence: {terms}")
    for citation in filter(None, (version.get("citation"), *spec.citations)):
        out(f"Cite: {citation}")


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_disk_space(files: list[RemoteFile], folder: Path) -> None:
    """Room for what is still to fetch plus the unpacked copy (JPEG and PNG barely compress: about the zips' size)."""
    remaining = sum(max(0, (f.size or 0) - _size(folder / f.name)) for f in files)
    unpacked = sum(f.size or 0 for f in files)
    need, free = int(1.05 * (remaining + unpacked)), shutil.disk_usage(folder).free
    if free < need:
        raise DownloadError(f"not enough free disk space in {folder.parent}: the download needs about {_gb(need)} "
                            f"({_gb(remaining)} still to fetch + {_gb(unpacked)} to unpack), {_gb(free)} is free. Free "
                            "some space or choose a folder on another disk with --to.")


class _Cut(Exception):
    """The body ended early or resumed at the wrong place: worth another (ranged) try."""


def fetch_file(file: RemoteFile, folder: Path, server: str, timeout: float = DEFAULT_TIMEOUT,
               out: Callable[[str], None] = print) -> Path:
    """``folder/<name>``, complete and verified: a verified file is kept, a partial one resumed, a cut retried."""
    path = folder / file.name
    if file.size is not None and _size(path) == file.size:
        try:
            verify(file, path)
            out(f"{file.name}: already downloaded and verified")
            return path
        except DownloadError:
            pass  # verify deleted it: fetch it again
    for attempt in range(RETRIES + 1):
        try:
            _stream(file, path, server, timeout)
            break
        except urllib.error.HTTPError as err:
            if err.code == 416:  # our partial file is no prefix of theirs: start again
                path.unlink(missing_ok=True)
            elif err.code < 500 and err.code != 429:  # 429 Too Many Requests: worth the backoff, as a 5xx
                raise DownloadError(f"{file.name}: the server refused it (HTTP {err.code} {err.reason})") from err
            problem = f"HTTP {err.code} {err.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException, _Cut) as err:
            problem = _reason(err, timeout)
        if attempt == RETRIES:
            raise DownloadError(f"{file.name}: failed after {RETRIES + 1} tries ({problem}); "
                                f"{_size(path)} bytes are kept and resumed by the next run")
        out(f"{file.name}: {problem}; trying again")
        time.sleep(BACKOFF_S * 2 ** attempt)
    verify(file, path)
    out(f"{file.name}: downloaded, {file.checksum_type or 'size'} verified")
    return path


def _stream(file: RemoteFile, path: Path, server: str, timeout: float) -> None:
    have = _size(path)
    if file.size is not None and have > file.size:
        path.unlink()
        have = 0
    with _open(file.url(server), timeout, have) as resp:
        if resp.status == 206:
            start = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if start is None or int(start.group(1)) != have:
                path.unlink(missing_ok=True)
                raise _Cut("the server resumed at another offset")
        else:
            have = 0  # 200: the server ignored Range and sends the whole file
        first = resp.read(CHUNK)
        if resp.headers.get_content_type() == "text/html" or (have == 0 and first.lstrip()[:1] == b"<"):
            raise DownloadError(f"{file.name}: the server sent an HTML page instead of the file (a login, guestbook "
                                f"or terms page?); open {RECORD_URL} in a browser to see what it asks for")
        with open(path, "ab" if have else "wb") as sink, \
                tqdm(total=file.size, initial=have, desc=file.name, unit="B", unit_scale=True, unit_divisor=1024,
                     leave=False, disable=None) as bar:
            chunk = first
            while chunk:
                sink.write(chunk)
                bar.update(len(chunk))
                chunk = resp.read(CHUNK)
    if file.size is not None and _size(path) < file.size:
        raise _Cut(f"the connection was cut after {_size(path)} of {file.size} bytes")


def verify(file: RemoteFile, path: Path) -> None:
    """Size and checksum as the record states them; a file that fails is deleted (resuming it cannot mend it)."""
    problem = None
    if file.size is not None and _size(path) != file.size:
        problem = f"{_size(path)} bytes instead of the record's {file.size}"
    elif file.checksum and (algorithm := HASHES.get((file.checksum_type or "").upper().replace("-", ""))):
        digest = hashlib.new(algorithm)
        with open(path, "rb") as source:
            while block := source.read(CHUNK):
                digest.update(block)
        if digest.hexdigest().lower() != file.checksum.lower():
            problem = f"{file.checksum_type} checksum {digest.hexdigest()} instead of the record's {file.checksum}"
    if problem:
        path.unlink(missing_ok=True)
        raise DownloadError(f"{file.name}: {problem}; the corrupt file was deleted, run the command again")


# ---- the command -----------------------------------------------------------------------------------------------------

def _already_complete(to: Path, dataset: str, force: bool, out: Callable[[str], None]) -> bool:
    """True when ``to`` holds our finished download (and not --force); refuses a folder that is not ours."""
    marker = to / MARKER
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except (OSError, ValueError) as err:
            raise DownloadError(f"{marker} is not a readable download record ({err}): move {to} away, or delete "
                                "the marker and run again with --force") from err
        if done.get("dataset") != dataset:
            raise DownloadError(f"{to} holds a {done.get('dataset')} download, not {dataset}: choose another --to")
        if not force:
            out(f"{to} already holds a complete {dataset} download (record version {done.get('version')}, "
                f"{done.get('downloaded')}); nothing to do (--force downloads it again)")
            return True
    elif to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise DownloadError(f"{to} exists, is not empty and holds no {MARKER}: it is not a download of ours, so it "
                            "is left alone. Choose another folder with --to, or move it away.")
    return False


def download(dataset: str, to: Path | None = None, server: str = DEFAULT_SERVER, force: bool = False,
             timeout: float = DEFAULT_TIMEOUT, out: Callable[[str], None] = print) -> Path:
    """Fetch, verify and unpack ``dataset`` (``ham10000`` or ``isic2018-test``) into ``to``; returns ``to``."""
    if dataset not in DATASETS:
        raise DownloadError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    spec, server = DATASETS[dataset], server.rstrip("/")
    to = Path(to) if to is not None else PROJECT_ROOT / spec.default_dir
    if _already_complete(to, dataset, force, out):
        return to
    staging = to.parent / f".{to.name}.download"
    manual = (f"To do it by hand (see README, 'Data'): download the files from {RECORD_URL} and unpack them into "
              f"{to}, or run the command again: finished files are kept in {staging} and a partial one is resumed.")
    try:
        version = fetch_record(server, timeout)
        files = match_files(version, spec)
    except DownloadError as err:
        raise DownloadError(f"{err}\n{manual}") from err
    _print_terms(version, spec, out)
    folder = staging / "files"
    folder.mkdir(parents=True, exist_ok=True)
    check_disk_space([f for f, _ in files], folder)
    try:
        paths = [(fetch_file(f, folder, server, timeout, out), role) for f, role in files]
    except DownloadError as err:
        raise DownloadError(f"{err}\n{manual}") from err
    tree = staging / "unpack"
    shutil.rmtree(tree, ignore_errors=True)
    unpack(paths, tree, out)
    record = {"dataset": dataset, "doi": DOI, "server": server, "version": _version(version),
              "downloaded": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "files": [{"name": f.name, "id": f.id, "size": f.size, "checksum": f"{f.checksum_type}:{f.checksum}"}
                        for f, _ in files]}
    (tree / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    if to.is_dir() and not any(to.iterdir()):
        to.rmdir()
    elif to.exists():  # --force over our own complete download: swap, then drop the old one
        to.rename(staging / "old")
    to.parent.mkdir(parents=True, exist_ok=True)
    tree.rename(to)
    shutil.rmtree(staging, ignore_errors=True)
    out(f"{dataset}: complete in {to}")
    return to


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``download`` on ``train.py``'s subcommands."""
    p = subparsers.add_parser("download", help="fetch HAM10000 or the ISIC 2018 Task 3 test set from Harvard "
                                               "Dataverse (doi:10.7910/DVN/DBW86T), verified and unpacked")
    p.add_argument("dataset", choices=list(DATASETS))
    p.add_argument("--to", type=Path, help="folder to create (default: data/ham10000 or data/isic2018_test)")
    p.add_argument("--server", default=DEFAULT_SERVER, help="Dataverse installation (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="download again over a complete earlier download")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds to wait for a connection or for data before giving up (default: %(default)s)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> None:
    download(args.dataset, args.to, args.server, args.force, args.timeout)
