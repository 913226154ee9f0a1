"""`train.py download` (core.download) against a local stand-in of the Dataverse record: the layout core.data reads,
resume after a cut, verification, and every way it can fail — each with a clear DownloadError, nothing that looks
complete left behind. No network, no real data folder (everything under tmp_path)."""
from __future__ import annotations

import argparse
import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from core import download as dl
from core.data import DataError, read_dataset, read_ham10000
from tests.dataverse_server import FakeDataverse, FakeFile

HAM_IDS = ["ISIC_0024306", "ISIC_0024307", "ISIC_0024308", "ISIC_0024309"]
TEST_IDS = ["ISIC_0034524", "ISIC_0034525", "ISIC_0034526"]
HAM_METADATA = ("lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"
                "HAM_0000001,ISIC_0024306,nv,follow_up,45.0,male,back,vidir_molemax\n"
                "HAM_0000001,ISIC_0024307,nv,follow_up,45.0,male,back,vidir_molemax\n"
                "HAM_0000002,ISIC_0024308,mel,histo,70.0,female,face,rosendahl\n"
                "HAM_0000003,ISIC_0024309,bcc,histo,,unknown,trunk,vienna_dic\n")
TEST_TRUTH = ("lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"
              "HAMTEST_0000001,ISIC_0034524,nv,follow_up,40.0,female,back,vidir_modern\n"
              "HAMTEST_0000002,ISIC_0034525,mel,histo,65.0,male,trunk,rosendahl\n"
              "HAMTEST_0000002,ISIC_0034526,mel,histo,65.0,male,trunk,rosendahl\n")
ONE_HOT_TRUTH = ("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n"
                 "ISIC_0034524,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n"
                 "ISIC_0034525,1.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
                 "ISIC_0034526,0.0,0.0,0.0,0.0,0.0,0.0,1.0\n"
                 "ISIC_0034527,0.0,0.0,1.0,0.0,0.0,0.0,0.0\n")   # no image for this one: left out, with a message


def picture(i: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (64, 48), (40 * i % 256, 90, 160) if mode == "RGB" else 255).save(buffer, fmt)
    return buffer.getvalue()


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def record_files() -> list[FakeFile]:
    """The record's six files in miniature: folders inside the zips, macOS litter and a licence file to skip."""
    return [
        FakeFile("HAM10000_images_part_1.zip", zipped({
            "HAM10000_images_part_1/ISIC_0024306.jpg": picture(1),
            "HAM10000_images_part_1/ISIC_0024307.jpg": picture(2),
            "__MACOSX/HAM10000_images_part_1/._ISIC_0024306.jpg": b"junk"})),
        FakeFile("HAM10000_images_part_2.zip", zipped({"ISIC_0024308.jpg": picture(3),
                                                       "ISIC_0024309.jpg": picture(4)})),
        FakeFile("HAM10000_metadata.csv", HAM_METADATA.encode(), tabular=True),
        FakeFile("HAM10000_segmentations_lesion_tschandl.zip", zipped({
            f"HAM10000_segmentations_lesion_tschandl/{i}_segmentation.png": picture(0, "PNG", "L") for i in HAM_IDS})),
        FakeFile("ISIC2018_Task3_Test_Images.zip", zipped({
            **{f"ISIC2018_Task3_Test_Images/{i}.jpg": picture(n) for n, i in enumerate(TEST_IDS)},
            "ISIC2018_Task3_Test_Images/ATTRIBUTION.txt": b"see the record"})),
        FakeFile("ISIC2018_Task3_Test_GroundTruth.csv", TEST_TRUTH.encode()),
        FakeFile("ISIC2018_Task3_Test_NatureMedicine_AI_Interaction_Benefit.csv", b"a,b\n1,2\n"),
    ]


@pytest.fixture
def server() -> Iterator[FakeDataverse]:
    with FakeDataverse(record_files()) as fake:
        yield fake


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)


def fetch(server: FakeDataverse, to: Path, dataset: str = "ham10000", **kwargs) -> tuple[Path, list[str]]:
    lines: list[str] = []
    return dl.download(dataset, to, server.url, timeout=kwargs.pop("timeout", 5.0), out=lines.append, **kwargs), lines


def data_requests(server: FakeDataverse) -> list[dict]:
    return [r for r in server.requests if r["path"].startswith("/api/access/datafile/")]


def assert_nothing_complete(to: Path) -> None:
    assert not to.exists(), f"{to} must not exist after a failed download"
    assert not list(to.parent.glob(f"**/{dl.MARKER}"))


def test_ham10000_full_download_reads_with_core_data(server: FakeDataverse, tmp_path: Path) -> None:
    to, lines = fetch(server, tmp_path / "ham")
    frame = read_ham10000(to)
    assert sorted(frame["image_id"]) == HAM_IDS
    assert frame["mask_path"].notna().all()
    assert sorted(frame["source"].unique()) == ["rosendahl", "vidir_molemax", "vienna_dic"]
    assert frame.set_index("image_id").loc["ISIC_0024308", "label"] == 1
    assert sorted(p.name for p in (to / "images").iterdir()) == [f"{i}.jpg" for i in HAM_IDS]  # flat, no litter
    marker = json.loads((to / dl.MARKER).read_text())
    assert marker["dataset"] == "ham10000" and marker["version"] == "4.0" and len(marker["files"]) == 4
    assert not (tmp_path / ".ham.download").exists(), "the staging folder is removed once the data is in place"
    metadata = next(r for r in data_requests(server) if r["query"])
    assert metadata["query"] == {"format": "original"}, "the ingested table is fetched as its original CSV"
    assert any("CC BY-NC-SA 4.0" in line for line in lines) and any("sdata.2018.161" in line for line in lines)


def test_isic2018_test_set_reads_with_the_labels_reader(server: FakeDataverse, tmp_path: Path) -> None:
    to, _ = fetch(server, tmp_path / "isic2018_test", "isic2018-test")
    frame = read_dataset(to / "labels.csv", to / "images")
    assert sorted(frame["image_id"]) == TEST_IDS
    assert frame.set_index("image_id")["dx"].to_dict() == {"ISIC_0034524": "nv", "ISIC_0034525": "mel",
                                                           "ISIC_0034526": "mel"}
    assert set(frame["source"]) == {"vidir_modern", "rosendahl"}
    with_lesions = read_dataset(to / "labels.csv", to / "images", to / "metadata.csv")
    assert with_lesions["lesion_id"].nunique() == 2  # the two images of one lesion stay together
    assert sorted(p.name for p in (to / "images").iterdir()) == [f"{i}.jpg" for i in TEST_IDS]


def test_one_hot_ground_truth_and_rows_without_images(tmp_path: Path) -> None:
    files = record_files()
    files[5] = FakeFile("ISIC2018_Task3_Test_GroundTruth.csv", ONE_HOT_TRUTH.encode(), tabular=True)
    with FakeDataverse(files) as fake:
        to, lines = fetch(fake, tmp_path / "isic", "isic2018-test")
    frame = read_dataset(to / "labels.csv", to / "images")
    assert frame.set_index("image_id")["dx"].to_dict() == {"ISIC_0034524": "nv", "ISIC_0034525": "mel",
                                                           "ISIC_0034526": "vasc"}
    assert any("ISIC_0034527" in line and "left out" in line for line in lines)


def test_file_listing_from_the_versions_endpoint(server: FakeDataverse, tmp_path: Path) -> None:
    server.inline_files = False
    server.license = None  # no licence in the record: the known one is printed
    to, lines = fetch(server, tmp_path / "ham")
    assert (to / dl.MARKER).is_file()
    assert any(r["path"] == "/api/datasets/:persistentId/versions/:latest/files" for r in server.requests)
    assert any(dl.KNOWN_LICENSE in line for line in lines)


def test_resume_after_a_cut_connection_within_one_run(server: FakeDataverse, tmp_path: Path) -> None:
    server.cut["HAM10000_images_part_1.zip"] = 1
    to, lines = fetch(server, tmp_path / "ham")
    ranged = [r for r in data_requests(server) if r["range"]]
    assert len(ranged) == 1 and ranged[0]["range"] != "bytes=0-"
    assert any("cut" in line and "trying again" in line for line in lines)
    assert len(read_ham10000(to)) == 4


def test_resume_through_a_redirect_to_storage(server: FakeDataverse, tmp_path: Path) -> None:
    server.redirect = True  # Harvard sends big files from S3: the Range header must survive the 303
    server.cut["HAM10000_images_part_1.zip"] = 1
    to, _ = fetch(server, tmp_path / "ham")
    ranged = [r for r in server.requests if r["range"]]
    assert len(ranged) == 2 and ranged[1]["path"].startswith("/s3/") and ranged[0]["range"] == ranged[1]["range"]
    assert len(read_ham10000(to)) == 4


def test_resume_in_a_second_run(server: FakeDataverse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "RETRIES", 0)
    server.cut["HAM10000_images_part_2.zip"] = 1
    with pytest.raises(dl.DownloadError, match="HAM10000_images_part_2.zip.*cut.*resumed by the next run") as err:
        fetch(server, tmp_path / "ham")
    assert "README, 'Data'" in str(err.value) and "https://doi.org/10.7910/DVN/DBW86T" in str(err.value)
    assert_nothing_complete(tmp_path / "ham")
    server.requests.clear()
    to, lines = fetch(server, tmp_path / "ham")
    assert "HAM10000_images_part_1.zip: already downloaded and verified" in lines  # not fetched again
    part_2 = [r for r in data_requests(server) if r["range"]]
    assert len(part_2) == 1 and part_2[0]["range"].startswith("bytes=")
    assert len(read_ham10000(to)) == 4


def test_a_server_that_ignores_range_gets_a_fresh_download(server: FakeDataverse, tmp_path: Path) -> None:
    server.cut["HAM10000_images_part_1.zip"] = 1
    server.ignore_range = True
    to, _ = fetch(server, tmp_path / "ham")
    assert any(r["range"] for r in data_requests(server))
    assert len(read_ham10000(to)) == 4


def test_checksum_mismatch(server: FakeDataverse, tmp_path: Path) -> None:
    server.corrupt.add("HAM10000_segmentations_lesion_tschandl.zip")
    with pytest.raises(dl.DownloadError, match=r"HAM10000_segmentations_lesion_tschandl.zip: MD5 checksum .* instead"):
        fetch(server, tmp_path / "ham")
    assert_nothing_complete(tmp_path / "ham")
    assert not list(tmp_path.glob("**/HAM10000_segmentations_lesion_tschandl.zip")), "the corrupt file is deleted"


def test_a_file_missing_from_the_record(server: FakeDataverse, tmp_path: Path) -> None:
    server.remove("HAM10000_images_part_2.zip")
    with pytest.raises(dl.DownloadError, match=r"HAM10000_images_part_2.zip is not in the record .*"
                                               r"HAM10000_images_part_1.zip") as err:
        fetch(server, tmp_path / "ham")
    assert "HAM10000_metadata.csv" in str(err.value)
    assert not data_requests(server), "nothing is downloaded when the record lacks a file"
    assert_nothing_complete(tmp_path / "ham")


def test_names_found_by_stem(tmp_path: Path) -> None:
    files = record_files()
    files[0] = FakeFile("HAM10000_images_part1.zip", files[0].content)  # the spelling of the record's description
    with FakeDataverse(files) as fake:
        to, _ = fetch(fake, tmp_path / "ham")
    assert len(read_ham10000(to)) == 4


@pytest.mark.parametrize("html_content_type", [True, False])
def test_html_instead_of_the_file(server: FakeDataverse, tmp_path: Path, html_content_type: bool) -> None:
    if html_content_type:
        server.html.add("HAM10000_images_part_1.zip")
    else:  # an HTML body sent as a binary type is caught by its first byte
        server.files[1000].content = b"  <html><body>Terms of use</body></html>"
    with pytest.raises(dl.DownloadError, match="HAM10000_images_part_1.zip: the server sent an HTML page"):
        fetch(server, tmp_path / "ham")
    assert_nothing_complete(tmp_path / "ham")


def test_http_403(server: FakeDataverse, tmp_path: Path) -> None:
    server.status["HAM10000_metadata.csv"] = 403
    with pytest.raises(dl.DownloadError, match=r"HAM10000_metadata.csv: the server refused it \(HTTP 403") as err:
        fetch(server, tmp_path / "ham")
    assert "by hand" in str(err.value)
    assert len([r for r in data_requests(server) if r["query"]]) == 1, "a 403 is not retried"
    assert_nothing_complete(tmp_path / "ham")


def test_http_429_is_retried_then_named(server: FakeDataverse, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)
    server.status["HAM10000_metadata.csv"] = 429
    with pytest.raises(dl.DownloadError, match=r"HAM10000_metadata.csv: failed after 3 tries \(HTTP 429"):
        fetch(server, tmp_path / "ham")
    assert len([r for r in data_requests(server) if r["query"]]) == 3, "too many requests: tried again, bounded"
    assert_nothing_complete(tmp_path / "ham")


def test_an_unreadable_marker_is_named_not_a_traceback(server: FakeDataverse, tmp_path: Path) -> None:
    to, _ = fetch(server, tmp_path / "ham")
    (to / ".complete.json").write_text("{not json")
    with pytest.raises(dl.DownloadError, match=r"\.complete\.json is not a readable download record"):
        fetch(server, to)


def test_read_timeout_fails_fast(server: FakeDataverse, tmp_path: Path) -> None:
    server.stall.add("HAM10000_images_part_1.zip")
    with pytest.raises(dl.DownloadError, match=r"HAM10000_images_part_1.zip: failed after 3 tries \(no answer from "
                                               r"the server for 0.2 s"):
        fetch(server, tmp_path / "ham", timeout=0.2)
    assert_nothing_complete(tmp_path / "ham")


def test_offline(tmp_path: Path) -> None:
    with FakeDataverse([]) as fake:
        url = fake.url  # the port is closed once the server stops
    with pytest.raises(dl.DownloadError, match=r"could not reach http://127.0.0.1:\d+ .*offline") as err:
        dl.download("ham10000", tmp_path / "ham", url, timeout=2, out=lambda _: None)
    assert "by hand" in str(err.value) and isinstance(err.value, DataError)
    assert_nothing_complete(tmp_path / "ham")


def test_not_enough_disk_space(server: FakeDataverse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(dl.DownloadError, match="not enough free disk space .* --to"):
        fetch(server, tmp_path / "ham")
    assert not data_requests(server)


def test_complete_destination_is_skipped_unless_forced(server: FakeDataverse, tmp_path: Path) -> None:
    to, _ = fetch(server, tmp_path / "ham")
    server.requests.clear()
    _, lines = fetch(server, to)
    assert not server.requests and any("already holds a complete ham10000 download" in line for line in lines)
    (to / "images" / "ISIC_0024306.jpg").unlink()
    fetch(server, to, force=True)
    assert (to / "images" / "ISIC_0024306.jpg").is_file() and len(data_requests(server)) == 4
    with pytest.raises(dl.DownloadError, match="holds a ham10000 download, not isic2018-test"):
        fetch(server, to, "isic2018-test")


def test_foreign_destination_is_refused(server: FakeDataverse, tmp_path: Path) -> None:
    to = tmp_path / "mine"
    to.mkdir()
    (to / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(dl.DownloadError, match="not empty and holds no .complete.json"):
            fetch(server, to, force=force)
    assert (to / "notes.txt").read_text() == "keep me" and not server.requests


def test_empty_destination_is_used(server: FakeDataverse, tmp_path: Path) -> None:
    (tmp_path / "ham").mkdir()
    to, _ = fetch(server, tmp_path / "ham")
    assert len(read_ham10000(to)) == 4


def test_cli_parser(server: FakeDataverse, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    dl.add_parser(sub)
    args = parser.parse_args(["download", "isic2018-test", "--to", str(tmp_path / "t"), "--server", server.url,
                              "--timeout", "5"])
    assert (args.dataset, args.force, args.timeout) == ("isic2018-test", False, 5.0)
    args.func(args)
    assert (tmp_path / "t" / "labels.csv").is_file() and "complete in" in capsys.readouterr().out
    defaults = parser.parse_args(["download", "ham10000"])
    assert (defaults.to, defaults.server, defaults.timeout) == (None, dl.DEFAULT_SERVER, dl.DEFAULT_TIMEOUT)
    with pytest.raises(SystemExit):
        parser.parse_args(["download", "isic2019"])


def test_train_main_reports_a_download_error_without_traceback(server: FakeDataverse, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import train
    from tests.helpers import run_main

    build = train.build_parser

    def with_download() -> argparse.ArgumentParser:
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "download" not in sub.choices:  # until train.py registers it itself
            dl.add_parser(sub)
        return parser

    monkeypatch.setattr(train, "build_parser", with_download)
    server.status["HAM10000_images_part_1.zip"] = 403
    code, _, err = run_main(train.main, "download", "ham10000", "--to", str(tmp_path / "ham"), "--server", server.url)
    assert code == 2 and err.startswith("error: HAM10000_images_part_1.zip: the server refused it (HTTP 403")
    assert "Traceback" not in err and "README, 'Data'" in err
