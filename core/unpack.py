"""Unpacking a downloaded record (``train.py download``) into the layout :mod:`core.data` reads: image and mask zips
flattened into ``images/`` and ``masks/``, HAM10000's metadata table as ``HAM10000_metadata.csv``, and a test set's
ground truth as ``labels.csv`` in the challenge's one-hot form, which :func:`core.data.read_dataset` reads."""
from __future__ import annotations

import csv
import io
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from core.data import HAM10000_COLUMNS, HAM10000_METADATA, IMAGE_EXTENSIONS, ISIC2018_COLUMNS, DataError


class UnpackError(DataError):
    """A downloaded file that cannot be unpacked into the project's layout; the message names it and says why."""


def _unzip_flat(archive: Path, dest: Path, suffixes: tuple[str, ...]) -> int:
    """Members with these suffixes straight into ``dest`` (folders inside the zip flattened, macOS litter skipped)."""
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                member = PurePosixPath(info.filename.replace("\\", "/"))
                if (info.is_dir() or "__MACOSX" in member.parts or member.name.startswith(".")
                        or member.suffix.lower() not in suffixes):
                    continue
                with zf.open(info) as source, open(dest / member.name, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                count += 1
    except zipfile.BadZipFile as err:
        raise UnpackError(f"{archive.name}: not a readable zip file ({err})") from err
    if not count:
        raise UnpackError(f"{archive.name}: holds no {'/'.join(suffixes)} files")
    return count


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV or tab-separated table (an ingested table's original may be either), header stripped."""
    text = path.read_text(encoding="utf-8-sig")
    header = text.split("\n", 1)[0]
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if header.count("\t") > header.count(",") else ",")
    reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
    return reader.fieldnames, list(reader)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as sink:
        writer = csv.DictWriter(sink, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_metadata(source: Path, tree: Path, images: set[str]) -> int:
    columns, rows = _read_table(source)
    if missing := [c for c in HAM10000_COLUMNS if c not in columns]:
        raise UnpackError(f"{source.name}: missing column(s) {', '.join(missing)} (found {', '.join(columns)})")
    if lost := [r["image_id"] for r in rows if r["image_id"].strip().lower() not in images]:
        raise UnpackError(f"{source.name}: {len(lost)} image id(s) have no image in the zips, e.g. {lost[:5]}")
    _write_csv(tree / HAM10000_METADATA, columns, rows)
    return len(rows)


def _write_labels(source: Path, tree: Path, images: set[str], out: Callable[[str], None]) -> int:
    """``labels.csv`` in the challenge's one-hot form (``image,MEL,…,VASC`` + ``dataset``), which
    :func:`core.data.read_dataset` reads; HAM10000-schema ground truth also gives ``metadata.csv`` (lesion ids)."""
    columns, rows = _read_table(source)
    if {"image_id", "dx"} <= set(columns):
        codes = {c.lower(): c for c in ISIC2018_COLUMNS}
        if bad := sorted({r["dx"] for r in rows if r["dx"].strip().lower() not in codes}):
            raise UnpackError(f"{source.name}: unknown dx code(s) {bad}")
        for row in rows:
            row["image"] = row["image_id"]
            row.update({c: "1.0" if codes[row["dx"].strip().lower()] == c else "0.0" for c in ISIC2018_COLUMNS})
    elif not {"image", *ISIC2018_COLUMNS} <= set(columns):
        raise UnpackError(f"{source.name}: neither HAM10000-schema (image_id, dx, …) nor one-hot "
                            f"(image, {', '.join(ISIC2018_COLUMNS)}) ground truth; found {', '.join(columns)}")
    kept = [r for r in rows if r["image"].strip().lower() in images]
    if lost := [r["image"] for r in rows if r["image"].strip().lower() not in images]:
        out(f"{source.name}: {len(lost)} row(s) have no image in the zip and are left out of labels.csv: {lost[:5]}")
    _write_csv(tree / "labels.csv", ["image", *ISIC2018_COLUMNS, *(["dataset"] if "dataset" in columns else [])], kept)
    if {"image_id", "lesion_id"} <= set(columns):
        extra = [c for c in ("dx_type", "age", "sex", "localization") if c in columns]
        _write_csv(tree / "metadata.csv", ["image_id", "lesion_id", *extra], kept)
    return len(kept)


def unpack(files: list[tuple[Path, str]], tree: Path, out: Callable[[str], None]) -> None:
    """Each ``(file, role)`` (images, masks, metadata or labels) into the new folder ``tree``: images first, so the
    tables can be checked against them."""
    order = {"images": 0, "masks": 1, "metadata": 2, "labels": 2}
    tree.mkdir(parents=True)
    for path, role in sorted(files, key=lambda pair: order[pair[1]]):
        if role in ("images", "masks"):
            n = _unzip_flat(path, tree / role, IMAGE_EXTENSIONS if role == "images" else (".png",))
        else:
            images = {p.stem.lower() for p in (tree / "images").iterdir()}
            n = (_write_metadata(path, tree, images) if role == "metadata"
                 else _write_labels(path, tree, images, out))
        out(f"{path.name}: {n} {'rows' if role in ('metadata', 'labels') else role} unpacked")
