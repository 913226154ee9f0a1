"""The acquisition stress test: each edit does what its name says (and a neutral one next to nothing), a colour match
moves one source's typical colours onto another's and leaves a source's own images alone, the summary reads every
edit against the neutral-edit floor; then the real CLI on a few images of the shipped model."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import train
from core.audit import acquisition
from core.audit.acquisition import EDITS, NEUTRAL_EDITS, ColourMatch, ColourStats, create_edits, image_colour
from core.audit.stress import edited_probabilities, stress_table, summarize_acquisition
from core.runs import DEFAULT_RUN, RunError, read_acquisition, read_acquisition_summary, read_metrics
from tests.helpers import run_main


def lesion_photo(seed: int = 0, shape: tuple[int, int] = (150, 200)) -> np.ndarray:
    """Textured skin with a dark, blotchy lesion in the middle: uint8 RGB (H, W, 3)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    lesion = ((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 5)) ** 2 <= 1
    image = np.array([200.0, 150.0, 130.0]) + rng.normal(0, 12, (h, w, 3))
    image[lesion] = np.array([110.0, 70.0, 55.0]) + rng.normal(0, 18, (lesion.sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def mean_abs_change(edit_name: str, image: np.ndarray) -> float:
    return float(np.abs(create_edits([edit_name])[0](image).astype(float) - image).mean())


@pytest.mark.parametrize("name", list(EDITS))
def test_an_edit_keeps_shape_and_type_and_is_deterministic(name: str) -> None:
    image = lesion_photo(1)
    edit = create_edits([name])[0]
    out = edit(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out, edit(image.copy()))
    assert edit.name == name and edit.kind in ("neutral", "camera") and edit.what


def test_neutral_edits_change_next_to_nothing() -> None:
    image = lesion_photo(2)
    assert NEUTRAL_EDITS == ("jpeg_90", "shift_2px", "brighter_3pct")
    assert mean_abs_change("brighter_3pct", image) < 5
    shifted = create_edits(["shift_2px"])[0](image)
    assert np.array_equal(shifted[2:, 2:], image[:-2, :-2])  # the frame moved, nothing else
    # JPEG 90 changes the file less than JPEG 50, and that less than JPEG 30.
    jpeg = [mean_abs_change(name, image) for name in ("jpeg_90", "jpeg_50", "jpeg_30")]
    assert jpeg[0] < jpeg[1] < jpeg[2]


def test_camera_edits_do_what_their_names_say() -> None:
    image = lesion_photo(3)
    warmer, cooler = (create_edits([name])[0](image).astype(float) for name in ("warmer", "cooler"))
    red, blue = image[..., 0].mean(), image[..., 2].mean()
    assert warmer[..., 0].mean() > red and warmer[..., 2].mean() < blue
    assert cooler[..., 0].mean() < red and cooler[..., 2].mean() > blue
    assert create_edits(["gamma_080"])[0](image).mean() > image.mean() > create_edits(["gamma_125"])[0](image).mean()

    def detail(x: np.ndarray) -> float:  # high-frequency energy: what resolution and focus take away
        return float(np.abs(np.diff(x.astype(float), axis=1)).mean())

    assert detail(create_edits(["blur"])[0](image)) < 0.6 * detail(image)
    assert detail(create_edits(["resample_half"])[0](image)) < 0.8 * detail(image)
    flat = np.full((150, 200, 3), (180, 120, 100), dtype=np.uint8)  # nothing to lose: flat stays flat
    assert np.abs(create_edits(["resample_half"])[0](flat).astype(int) - flat).max() <= 1


def test_a_colour_match_moves_one_sources_colours_onto_anothers() -> None:
    photos = {"here": [lesion_photo(s) for s in range(4)],
              "there": [np.clip(lesion_photo(10 + s).astype(float) * [0.8, 0.95, 1.1] + 10, 0, 255).astype(np.uint8)
                        for s in range(4)]}
    colours = acquisition.source_colours([*photos["here"], *photos["there"]], ["here"] * 4 + ["there"] * 4)
    assert set(colours) == {"here", "there"}
    edit = create_edits(["colour_there"], colours)[0]
    assert isinstance(edit, ColourMatch) and edit.kind == "camera"
    assert not edit.applies_to("there") and edit.applies_to("here")
    moved_mean, _ = image_colour(edit(photos["here"][0], "here"))
    own_mean, _ = image_colour(photos["here"][0])
    target = np.asarray(colours["there"].mean)
    # The typical "here" photo now has (about) the typical "there" colours: far closer than before.
    assert np.abs(moved_mean - target).sum() < 0.25 * np.abs(own_mean - target).sum()
    with pytest.raises(ValueError, match="own source"):
        edit(photos["here"][0])  # a colour match cannot guess where an image came from


def test_bad_input_and_unknown_edits_are_refused_with_their_reason() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        create_edits(["blur"])[0](np.zeros((10, 10, 3)))
    with pytest.raises(ValueError, match="uint8 RGB"):
        create_edits(["blur"])[0](np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="unknown acquisition edit 'sepia'; choose from jpeg_90"):
        create_edits(["sepia"])
    colours = {"a": ColourStats((50.0, 10.0, 10.0), (10.0, 5.0, 5.0))}
    with pytest.raises(ValueError, match="colour_b.*colour_a"):
        create_edits(["colour_b"], colours)


def acquisition_table(flips: dict[str, list[bool]], labels: list[int]) -> pd.DataFrame:
    """A stress table whose decisions flip exactly where ``flips`` says (clean p 0.4 or 0.6 around 0.5)."""
    n = len(labels)
    frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "lesion_id": [f"l{k}" for k in range(n)],
                          "dx": ["mel" if y else "nv" for y in labels], "label": labels,
                          "source": ["a", "b"] * (n // 2)})
    clean = np.where(np.array(labels) == 1, 0.6, 0.4)
    probabilities = {"clean": clean}
    for name, flipped in flips.items():
        probabilities[name] = np.where(flipped, 1 - clean, clean + 0.01)
    return stress_table(frame, probabilities, 0.5)


def test_the_summary_reads_each_edit_against_the_neutral_floor() -> None:
    labels = [0, 1] * 10
    flips = {"jpeg_90": [True] + [False] * 19,                 # 5 %
             "shift_2px": [True, True] + [False] * 18,         # 10 %: the floor is the largest neutral rate
             "jpeg_30": [True] * 3 + [False] * 17,             # 15 % = 1.5 × the floor: holds
             "warmer": [True] * 4 + [False] * 16}              # 20 % = 2 × the floor: fails
    table = acquisition_table(flips, labels)
    summary = summarize_acquisition(table, 0.5, create_edits(list(flips)), n_boot=50)
    assert summary["floor"]["rate"] == pytest.approx(0.10) and summary["floor"]["edits"] == ["jpeg_90", "shift_2px"]
    edits = summary["edits"]
    assert edits["jpeg_30"]["times_floor"] == pytest.approx(1.5) and edits["warmer"]["times_floor"] == pytest.approx(2)
    assert "times_floor" not in edits["jpeg_90"]
    assert summary["holds"]["failing"] == ["warmer"] and not summary["holds"]["passed"]
    assert summary["holds"]["worst"] == "warmer"
    low, high = edits["warmer"]["flipped_ci"]
    assert low < 0.2 < high
    assert edits["warmer"]["flipped_by_source"] == {"a": pytest.approx(0.2), "b": pytest.approx(0.2)}
    # Images 0–3 flip under some camera edit, images 0–1 under some neutral one.
    assert summary["decisions"] == {"changed_by_a_camera_edit": pytest.approx(0.2),
                                    "changed_by_a_neutral_edit": pytest.approx(0.1),
                                    "mean_camera_edit": pytest.approx(0.175), "mean_neutral_edit": pytest.approx(0.075)}
    held = summarize_acquisition(acquisition_table({k: flips[k] for k in ("jpeg_90", "shift_2px", "jpeg_30")},
                                                   labels), 0.5, create_edits(["jpeg_90", "shift_2px", "jpeg_30"]),
                                 n_boot=50)
    assert held["holds"]["passed"] and held["holds"]["failing"] == []


def test_a_colour_match_is_read_against_the_floor_of_the_images_it_was_scored_on() -> None:
    """A colour match skips its own source's images: its floor is the neutral flips on the others. Here source "a"
    (even images) holds every neutral flip, so a colour match scored on "b" alone has a floor of 0 and fails with a
    single flip, where against all images' floor it would have passed."""
    labels = [0, 1] * 10
    flips = {"jpeg_90": [True, False, True, False] + [False] * 16,  # 10 %, all on source "a"
             "colour_a": [False, True] + [False] * 18}                # one flip of a "b" image
    table = acquisition_table(flips, labels)
    table = table[~((table["intervention"] == "colour_a") & (table["source"] == "a"))]  # as the test scores it
    colours = {s: ColourStats((50.0, 10.0, 10.0), (10.0, 5.0, 5.0)) for s in ("a", "b")}
    summary = summarize_acquisition(table, 0.5, create_edits(["jpeg_90", "colour_a"], colours), n_boot=50)
    row = summary["edits"]["colour_a"]
    assert row["n"] == 10 and row["flipped"] == pytest.approx(0.1)
    assert row["floor"] == 0 and row["times_floor"] is None and not row["holds"]
    assert summary["floor"]["rate"] == pytest.approx(0.1)  # the floor on all images, for the edits scored on all
    assert summary["holds"]["failing"] == ["colour_a"] and summary["holds"]["worst"] == "colour_a"


def test_edited_copies_are_scored_as_the_run_sees_them_and_own_colours_are_skipped() -> None:
    photos = [lesion_photo(s) for s in range(5)]
    sources = ["a", "b", "a", "b", "a"]
    colours = acquisition.source_colours(photos, sources)
    edits = create_edits(["jpeg_90", "gamma_080", "colour_b"], colours)
    seen: list[torch.Tensor] = []

    def score(images: torch.Tensor) -> np.ndarray:  # a stand-in model: brightness of the view
        seen.append(images)
        return images.float().mean(dim=(1, 2, 3)).numpy() / 255

    cfg = SimpleNamespace(input_size=64, crop="square")
    p = edited_probabilities(score, photos, sources, edits, cfg, chunk=2)
    assert all(batch.shape[1:] == (3, 64, 64) and batch.dtype == torch.uint8 for batch in seen)
    assert sum(len(batch) for batch in seen) == 5 * 3 + 3  # clean + 2 edits each, + colour_b for the 3 "a" images
    assert np.isnan(p["colour_b"][[1, 3]]).all() and np.isfinite(p["colour_b"][[0, 2, 4]]).all()
    assert (p["gamma_080"] > p["clean"]).all()  # brighter mid-tones, brighter view
    assert np.abs(p["jpeg_90"] - p["clean"]).max() < 0.01


# ---------------------------------------------------------------- the real model and the command line

@pytest.fixture(scope="module")
def acquired_run(ham, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped run, put through the real CLI's acquisition suite on 12 test images."""
    run = tmp_path_factory.mktemp("acquisition") / "run"
    shutil.copytree(DEFAULT_RUN, run, ignore=shutil.ignore_patterns("cams_*", "stress_*", "acquisition_*"))
    code, out, err = run_main(train.main, "stress", "--run", str(run), "--suite", "acquisition", "--limit", "12",
                              "--edits", "jpeg_90", "shift_2px", "jpeg_30", "colour_rosendahl", "--device", "cpu")
    assert code == 0, err
    assert "floor" in out and "colour_rosendahl" in out and "acquisition_test.csv" in out
    return run


def test_cli_writes_the_table_and_a_summary_that_matches_it(acquired_run: Path) -> None:
    table = read_acquisition(acquired_run, "test")
    summary = read_acquisition_summary(acquired_run, "test")
    assert summary.n == 12 and summary.limit == 12 and summary.split_size == 1500
    assert list(summary.edits) == ["jpeg_90", "shift_2px", "jpeg_30", "colour_rosendahl"]
    counts = table.groupby("intervention").size()
    assert counts["jpeg_30"] == 12
    # Rosendahl's own images are not re-coloured as Rosendahl's.
    assert counts["colour_rosendahl"] == 12 - (table.drop_duplicates("image_id")["source"] == "rosendahl").sum()
    assert not (table[table["intervention"] == "colour_rosendahl"]["source"] == "rosendahl").any()
    threshold = read_metrics(acquired_run).thresholds["youden"]
    assert (table["flipped"] == ((table["p"] >= threshold) != (table["p_clean"] >= threshold))).all()
    predictions = pd.read_csv(acquired_run / "predictions_test.csv", dtype={"image_id": str}).set_index("image_id")
    clean = table.drop_duplicates("image_id").set_index("image_id")["p_clean"]
    # The clean image goes the file → crop → resize road, as evaluation's does: the same p.
    assert np.allclose(clean, predictions.loc[clean.index, "probability"], atol=1e-5)
    for name, row in summary.edits.items():
        assert row.flipped == pytest.approx(table[table["intervention"] == name]["flipped"].mean()), name
    assert summary.floor.rate == max(summary.edits[n].flipped for n in ("jpeg_90", "shift_2px"))
    assert set(summary.source_colours) == {"rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"}


def test_cli_refuses_what_it_cannot_do(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train.main(["stress", "--run", str(DEFAULT_RUN), "--suite", "acquisition", "--interventions", "ink"]) == 2
    assert "--edits" in capsys.readouterr().err
    assert train.main(["stress", "--run", str(DEFAULT_RUN), "--edits", "jpeg_30"]) == 2
    assert "add --suite acquisition" in capsys.readouterr().err
    with pytest.raises(RunError, match="stress --suite acquisition --split val"):
        read_acquisition_summary(tmp_path, "val")
