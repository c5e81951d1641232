"""``florist audit``: class balance, unusable/odd files, exact and near duplicates, label conflicts, tiny images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import images as im  # tests/images.py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import florist
from florist.audit import AuditReport, near_duplicate_pairs
from florist.cli import app
from florist.errors import FloristError


def write_pattern(path: Path, seed: int, size: tuple[int, int] = (160, 120)) -> Path:
    """A smooth random colour pattern: every seed gives a picture with its own perceptual hash."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize(size, Image.Resampling.BICUBIC).save(path, quality=92)
    return path


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A photo folder with one of each problem the audit looks for."""
    root = tmp_path_factory.mktemp("messy") / "photos"
    for c, name in enumerate(["cats", "dogs", "owls"]):
        for i in range(8 if name != "owls" else 2):
            write_pattern(root / name / f"{name}_{i}.jpg", seed=100 * c + i)
    shutil.copy(root / "cats" / "cats_0.jpg", root / "cats" / "cats_0_copy.jpg")  # exact duplicate
    shutil.copy(root / "cats" / "cats_1.jpg", root / "dogs" / "cats_1.jpg")  # same image, two classes
    with Image.open(root / "dogs" / "dogs_0.jpg") as img:  # near duplicate: smaller, re-compressed
        img.resize((150, 113)).save(root / "dogs" / "dogs_0_small.jpg", quality=60)
    im.write_truncated_jpeg(root / "dogs" / "broken.jpg")
    im.write_text_file(root / "owls" / "notes.jpg")
    im.write_bmp_as_jpg(root / "owls" / "really_a_bmp.jpg", size=(160, 120))
    write_pattern(root / "owls" / "tiny.jpg", seed=999, size=(40, 30))
    write_pattern(root / "loose.jpg", seed=998)  # an image outside any class folder
    (root / "README.txt").write_text("not odd: a text file at the top is expected\n")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def report(messy: Path) -> AuditReport:
    return florist.audit(messy)


def test_counts_per_class_and_imbalance(report) -> None:
    assert report.classes == {"cats": 9, "dogs": 10, "empty": 0, "owls": 4}
    assert report.n_files == 25 and report.n_images == 23
    assert any("'empty' has 0 usable image(s)" in w for w in report.warnings)
    assert any(w.startswith("class imbalance: 'dogs' has 10 images, 'owls' only 4") for w in report.warnings)


def test_exact_duplicates_and_label_conflicts(report) -> None:
    groups = {tuple(g.paths): g.classes for g in report.exact_duplicates}
    assert groups == {
        ("cats/cats_0.jpg", "cats/cats_0_copy.jpg"): ["cats", "cats"],
        ("cats/cats_1.jpg", "dogs/cats_1.jpg"): ["cats", "dogs"],
    }
    assert [g.paths for g in report.label_conflicts] == [["cats/cats_1.jpg", "dogs/cats_1.jpg"]]


def test_near_duplicates_exclude_exact_copies(report) -> None:
    pairs = [(n.paths, n.distance) for n in report.near_duplicates]
    assert [p for p, _ in pairs] == [["dogs/dogs_0.jpg", "dogs/dogs_0_small.jpg"]]
    assert pairs[0][1] <= report.settings["near_distance"]


def test_unusable_odd_and_tiny_files(report) -> None:
    unusable = {f.path: f.reason for f in report.unreadable}
    assert set(unusable) == {"dogs/broken.jpg", "owls/notes.jpg"}
    assert "not an image" in unusable["owls/notes.jpg"]
    odd = {f.path: f.reason for f in report.odd}
    assert odd == {
        "loose.jpg": "image outside any class folder: ignored",
        "owls/really_a_bmp.jpg": "BMP content but named .jpg",
    }
    assert [(t.path, t.width, t.height) for t in report.tiny] == [("owls/tiny.jpg", 40, 30)]


def test_near_duplicate_pairs_counts_differing_bits() -> None:
    hashes = [0b0, 0b111, 0b1, (1 << 64) - 1]
    assert near_duplicate_pairs(hashes, 1) == [(0, 2, 1)]
    assert near_duplicate_pairs(hashes, 3) == [(0, 1, 3), (0, 2, 1), (1, 2, 2)]
    assert near_duplicate_pairs(hashes, 64)[-1] == (2, 3, 63)


def test_clean_folder_has_no_warnings(photos: Path) -> None:
    result = florist.audit(photos, near_distance=-1, min_side=10)
    assert result.warnings == [] and result.near_duplicates == []


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FloristError, match="data folder not found"):
        florist.audit(tmp_path / "nope")


def test_cli_json_and_table(messy: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(messy), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["label_conflicts"][0]["paths"] == ["cats/cats_1.jpg", "dogs/cats_1.jpg"]
    assert data["n_images"] == 23 and len(data["unreadable"]) == 2

    result = runner.invoke(app, ["audit", str(messy), "--quiet"])
    assert result.exit_code == 0, result.output
    for text in (
        "label conflict",
        "exact duplicate",
        "near duplicate",
        "dogs/broken.jpg",
        "40x30 px",
        "warning:",
    ):
        assert text in result.stdout, text

    assert runner.invoke(app, ["audit", "--help"]).exit_code == 0


def test_real_flower_photos(flower_photos: Path) -> None:
    """The 1,500-photo subset holds one image under two classes and two exact duplicate pairs."""
    result = florist.audit(flower_photos)
    assert [g.paths for g in result.label_conflicts] == [
        ["roses/15922772266_1167a06620.jpg", "tulips/15922772266_1167a06620.jpg"]
    ]
    same = [g.paths for g in result.exact_duplicates if len(set(g.classes)) == 1]
    assert same == [
        ["sunflowers/14889392928_9742aed45b_m.jpg", "sunflowers/15066430311_fb57fa92b0_m.jpg"],
        ["sunflowers/15069459615_7e0fd61914_n.jpg", "sunflowers/15072973261_73e2912ef2_n.jpg"],
    ]
    assert len(result.near_duplicates) >= 10 and result.unreadable == [] and result.tiny == []
