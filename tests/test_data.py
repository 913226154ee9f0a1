"""Readers: HAM10000 layout, ISIC 2018/2019 ground truth, image,label CSVs, and every bad-input message."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from core.data import (
    HAM10000_COLUMNS,
    DataError,
    read_dataset,
    read_ham10000,
    read_isic_groundtruth,
    read_labelled_csv,
    resolve_data_dir,
)
from core.images import open_mask, open_rgb
from tests.helpers import ROWS, make_ham, write_image

# --- the real data ------------------------------------------------------------------------------------------------

def test_real_ham10000_is_read_whole(ham: pd.DataFrame) -> None:
    assert len(ham) == 10015 and ham["image_id"].is_unique
    assert ham["lesion_id"].nunique() == 7470
    assert ham["dx"].value_counts().to_dict() == {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327,
                                                  "vasc": 142, "df": 115}
    assert ham["label"].sum() == 1954  # mel + bcc + akiec
    assert (ham["label"] == ham["dx"].isin(["mel", "bcc", "akiec"])).all()
    assert set(HAM10000_COLUMNS) <= set(ham.columns)  # all metadata kept for subgroup analysis
    assert ham["mask_path"].notna().all()


def test_a_real_image_and_its_mask_go_through_the_training_transform_together(ham: pd.DataFrame) -> None:
    import torch
    from torchvision import tv_tensors

    from core.transforms import create_transform
    row = ham.iloc[2]
    mask = tv_tensors.Mask(torch.from_numpy(open_mask(row["mask_path"])).unsqueeze(0).to(torch.uint8))
    image, mask = create_transform(64, train=True)(open_rgb(row["path"]), mask)
    assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64) and mask.any()


# --- folder resolution --------------------------------------------------------------------------------------------

def test_resolution_prefers_argument_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_ham(tmp_path / "a", ROWS)
    b = make_ham(tmp_path / "b", ROWS)
    monkeypatch.setenv("HAM10000_DIR", str(b))
    assert resolve_data_dir(a) == a.resolve()
    assert resolve_data_dir() == b.resolve()


def test_resolution_rejects_wrong_explicit_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAM10000_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"\$HAM10000_DIR points to .*nowhere.*HAM10000_metadata.csv"):
        resolve_data_dir()
    with pytest.raises(DataError, match="--data-dir points to"):
        resolve_data_dir(tmp_path)


def test_resolution_lists_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import core.data
    monkeypatch.delenv("HAM10000_DIR", raising=False)
    monkeypatch.setattr(core.data, "PROJECT_ROOT", tmp_path / "project")
    with pytest.raises(DataError, match=r"(?s)No HAM10000 data found.*data/ham10000.*shared/data/ham10000.*README"):
        resolve_data_dir()


# --- HAM10000 bad input -------------------------------------------------------------------------------------------

def test_small_ham_folder_reads(tmp_path: Path) -> None:
    frame = read_ham10000(make_ham(tmp_path, ROWS))
    assert frame["label"].tolist() == [1, 1, 0, 1]
    assert frame["mask_path"].isna().all()  # masks are optional


def test_missing_columns_are_named(tmp_path: Path) -> None:
    root = make_ham(tmp_path, ROWS)
    meta = pd.read_csv(root / "HAM10000_metadata.csv").drop(columns=["dx", "lesion_id"])
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) lesion_id, dx"):
        read_ham10000(root)


def test_unknown_dx_codes_are_named_with_rows(tmp_path: Path) -> None:
    root = make_ham(tmp_path, ROWS[:2] + [("HAM_9", "ISIC_9", "melanoma")])
    with pytest.raises(DataError, match=r"unknown dx code\(s\) \['melanoma'\].*row 4 \(ISIC_9\)"):
        read_ham10000(root)


def test_ids_without_images_are_named(tmp_path: Path) -> None:
    root = make_ham(tmp_path, ROWS, images=["ISIC_1", "ISIC_2"])
    with pytest.raises(DataError, match=r"2 image id\(s\) have no image file.*ISIC_3.*ISIC_4"):
        read_ham10000(root)


def test_duplicate_ids_are_named(tmp_path: Path) -> None:
    root = make_ham(tmp_path, ROWS + [("HAM_5", "ISIC_2", "nv")], images=["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4"])
    with pytest.raises(DataError, match=r"1 duplicate image_id.*row 3 \(ISIC_2\).*row 6 \(ISIC_2\)"):
        read_ham10000(root)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = make_ham(tmp_path, ROWS)
    (root / "images" / "ISIC_3.jpg").write_bytes(b"not a jpeg at all")
    frame = read_ham10000(root)
    with pytest.raises(DataError, match=r"ISIC_3\.jpg: cannot read image"):
        open_rgb(frame["path"][2])


def test_not_a_csv(tmp_path: Path) -> None:
    root = make_ham(tmp_path, ROWS)
    (root / "HAM10000_metadata.csv").write_bytes(b"\xff\xfe\x00garbage\x00\x81")
    with pytest.raises(DataError, match="HAM10000_metadata.csv"):
        read_ham10000(root)


# --- ISIC ground truth and image,label ----------------------------------------------------------------------------

def test_isic2018_groundtruth(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for k, name in enumerate(["ISIC_A", "ISIC_B", "ISIC_C"]):
        write_image(tmp_path / "img" / f"{name}.jpg", size=(600, 450), seed=k)
    (tmp_path / "gt.csv").write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n"
                                     "ISIC_A,1.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
                                     "ISIC_B,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n"
                                     "ISIC_C,0.0,0.0,0.0,1.0,0.0,0.0,0.0\n")
    frame = read_dataset(tmp_path / "gt.csv", tmp_path / "img")
    assert frame["dx"].tolist() == ["mel", "nv", "akiec"] and frame["label"].tolist() == [1, 0, 1]
    assert frame["lesion_id"].tolist() == frame["image_id"].tolist()  # no metadata: each image its own lesion
    assert open_rgb(frame["path"][0]).size == (600, 450)


def test_isic2019_groundtruth_maps_ak_scc_and_skips_unk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "img").mkdir()
    names = ["ISIC_A", "ISIC_B_downsampled", "ISIC_C", "ISIC_D"]
    for k, name in enumerate(names):
        write_image(tmp_path / "img" / f"{name}.jpg", seed=k)
    (tmp_path / "gt.csv").write_text("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
                                     "ISIC_A,0,0,0,1,0,0,0,0,0\n"
                                     "ISIC_B,0,0,0,0,0,0,0,1,0\n"
                                     "ISIC_C,0,0,0,0,1,0,0,0,0\n"
                                     "ISIC_D,0,0,0,0,0,0,0,0,1\n")
    (tmp_path / "meta.csv").write_text("image,lesion_id,age_approx\nISIC_A,L1,50\nISIC_B,L1,50\nISIC_C,L2,40\n")
    with caplog.at_level(logging.WARNING):
        frame = read_isic_groundtruth(tmp_path / "gt.csv", tmp_path / "img", tmp_path / "meta.csv")
    assert frame["dx"].tolist() == ["akiec", "scc", "bkl"] and frame["label"].tolist() == [1, 1, 0]
    assert frame["lesion_id"].tolist() == ["L1", "L1", "L2"]
    assert frame["path"][1].endswith("ISIC_B_downsampled.jpg")
    assert "skipping 1 UNK row" in caplog.text and "ISIC_D" in caplog.text


def test_isic_groundtruth_not_one_hot(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "gt.csv").write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_A,1,1,0,0,0,0,0\n")
    with pytest.raises(DataError, match=r"not one-hot.*row 2 \(ISIC_A\)"):
        read_dataset(tmp_path / "gt.csv", tmp_path / "img")


def test_labelled_csv(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "a.png")
    write_image(tmp_path / "img" / "b.JPG", seed=1)
    (tmp_path / "labels.csv").write_text("image,label\na.png,1\nb,0\n")
    frame = read_labelled_csv(tmp_path / "labels.csv", tmp_path / "img")
    assert frame["image_id"].tolist() == ["a", "b"] and frame["label"].tolist() == [1, 0]
    assert frame["path"][1].endswith("b.JPG")


def test_the_source_is_carried_when_a_label_file_has_one(tmp_path: Path, ham: pd.DataFrame) -> None:
    """HAM10000's ``dataset``, a labels CSV's ``source`` or ``site``: read as ``source`` when there, never required."""
    counts = ham["source"].value_counts()
    assert counts.to_dict() == {"vidir_molemax": 3954, "vidir_modern": 3363, "rosendahl": 2259, "vienna_dias": 439}
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "a.png")
    write_image(tmp_path / "img" / "b.png", seed=1)
    (tmp_path / "sites.csv").write_text("image,label,site\na.png,1,clinic_a\nb.png,0,\n")
    assert read_labelled_csv(tmp_path / "sites.csv", tmp_path / "img")["source"].tolist() == ["clinic_a", "unknown"]
    (tmp_path / "plain.csv").write_text("image,label\na.png,1\nb.png,0\n")
    assert "source" not in read_labelled_csv(tmp_path / "plain.csv", tmp_path / "img")
    make_ham(tmp_path / "old", ROWS)  # the metadata of older HAM10000 copies: no dataset column
    assert "source" not in read_ham10000(tmp_path / "old")


def test_labelled_csv_bad_labels(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "labels.csv").write_text("image,label\na,1\nb,malignant\nc,2\n")
    with pytest.raises(DataError, match=r"label must be 0 \(benign\) or 1 \(malignant\).*row 3 \(b\), row 4 \(c\)"):
        read_labelled_csv(tmp_path / "labels.csv", tmp_path / "img")


def test_unrecognised_csv(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("file,diagnosis\na,mel\n")
    with pytest.raises(DataError, match="unrecognised label file.*file, diagnosis"):
        read_dataset(tmp_path / "x.csv", tmp_path)
    with pytest.raises(DataError, match="needs its image folder"):
        read_dataset(tmp_path / "x.csv")
