"""Heatmaps (florist.explain, `florist explain`): the real network's Grad-CAM, on the crop it saw."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import images as im  # tests/images.py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import florist
from florist.cli import app
from florist.errors import FloristError
from florist.explain import Explainer, png_names
from florist.export import ExportGraph
from florist.predict import Classifier

runner = CliRunner()
RED = (200, 30, 30)


@pytest.fixture(scope="module")
def explainer(trained_run: Path) -> Explainer:
    return Explainer.from_run(trained_run)


def patch_photo(path: Path, corner: int, seed: int = 0, colour: tuple[int, int, int] = RED) -> Path:
    """A 120x120 grey-noise PNG with a 50x50 patch of ``colour`` in ``corner`` (0 top left, 1 top right, 2, 3 bottom)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(128 + rng.normal(0, 20, (120, 120, 3)), 0, 255)
    rows = slice(0, 50) if corner < 2 else slice(70, 120)
    cols = slice(0, 50) if corner % 2 == 0 else slice(70, 120)
    pixels[rows, cols] = np.clip(np.array(colour) + rng.normal(0, 20, (50, 50, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def corners(heat: np.ndarray) -> list[float]:
    """Mean heat of the four corner thirds, in :func:`patch_photo`'s order."""
    q = heat.shape[0] // 3
    return [float(heat[:q, :q].mean()), float(heat[:q, -q:].mean()), float(heat[-q:, :q].mean()), float(heat[-q:, -q:].mean())]


def test_heatmap_covers_the_crop_and_names_the_models_answer(explainer: Explainer, trained_run: Path, photos: Path) -> None:
    photo = sorted((photos / "red").iterdir())[0]
    heatmap = explainer.explain_file(photo)
    side = explainer.data_config["input_size"][-1]
    assert heatmap.error is None
    assert heatmap.heat.shape == (side, side) and heatmap.heat.dtype == np.float32
    assert heatmap.crop.shape == (side, side, 3) and heatmap.crop.dtype == np.uint8
    assert np.isfinite(heatmap.heat).all() and heatmap.heat.min() >= 0 and heatmap.heat.max() == pytest.approx(1.0)
    assert heatmap.heat.std() > 0.01, "a flat map says nothing"
    expected = florist.load(trained_run).predict([photo], top_k=1)[0]
    assert heatmap.label == expected.labels[0] == heatmap.target == "red"
    assert heatmap.probability == pytest.approx(expected.probabilities[0], abs=0.02)  # torch vs the run's engine
    with Image.open(io.BytesIO(heatmap.encoded())) as png:
        assert png.format == "PNG" and png.size == (side, side) and png.mode == "RGB"
        pixels = np.asarray(png)
    assert not np.array_equal(pixels, heatmap.crop), "the heat is drawn over the crop"


@pytest.mark.parametrize("corner", range(4))
def test_the_heat_of_red_is_on_the_red_patch(explainer: Explainer, tmp_path: Path, corner: int) -> None:
    """The colour classes' network, asked where it sees red, points at the red corner, not the opposite one."""
    heatmap = explainer.explain_file(patch_photo(tmp_path / "patch.png", corner), target="red")
    assert heatmap.target == "red"
    heat = corners(heatmap.heat)
    assert heat[corner] > 1.2 * heat[3 - corner], heat


def test_a_mirrored_photo_gets_the_mirrored_heat(explainer: Explainer, tmp_path: Path) -> None:
    """Each test-time view's map is aligned with the crop: the clean view's, and the flip view's mirrored back."""
    assert explainer.views == ["clean", "flip"]
    side = 168  # the tiny net's resize size: the crop's margins are even, so mirroring commutes with it
    photo = patch_photo(tmp_path / "p.png", corner=0)
    Image.open(photo).resize((side, side)).save(photo)
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "m.png")
    heat = explainer.explain_file(photo, target="red").heat
    mirrored = explainer.explain_file(tmp_path / "m.png", target="red").heat
    assert not np.allclose(heat, heat[:, ::-1], atol=0.05), "a symmetric map would prove nothing"
    np.testing.assert_allclose(mirrored, heat[:, ::-1], atol=0.02)


def test_a_chosen_class_gets_its_own_heat(explainer: Explainer, photos: Path) -> None:
    photo = sorted((photos / "red").iterdir())[1]
    answer = explainer.explain_file(photo)
    blue = explainer.explain_file(photo, target="blue")
    assert blue.label == answer.label == "red" and blue.target == "blue"
    assert blue.target_probability < blue.probability == pytest.approx(answer.probability)
    assert not np.allclose(blue.heat, answer.heat, atol=0.05)
    with pytest.raises(FloristError, match="unknown class 'violet'.*blue, green, red"):
        explainer.explain_file(photo, target="violet")


def test_exported_models_other_files_and_several_backbones_are_refused(
    trained_run: Path, exported_onnx: Path, tiny_backbone, photos: Path, tmp_path: Path
) -> None:
    with pytest.raises(FloristError, match="exported model.*pass the run folder"):
        Explainer.from_run(exported_onnx)
    with pytest.raises(FloristError, match="no finished model"):
        Explainer.from_run(tmp_path)
    photo = sorted((photos / "red").iterdir())[0]
    with pytest.raises(FloristError, match="is a file: expected a run folder"):
        Explainer.from_run(photo)
    run = florist.load(trained_run, engine="torch")
    features = 2 * tiny_backbone.num_features
    two = Classifier([tiny_backbone, tiny_backbone], torch.nn.Linear(features, 3), run.classes)
    with pytest.raises(FloristError, match="one backbone; this one concatenates 2"):
        Explainer(ExportGraph(two), run.classes)


def test_png_names_keep_stems_and_number_clashes() -> None:
    assert png_names(["a/rose.jpg", "b/rose.jpg", "c/Rose.png", "tulip.jpeg", "no extension", "d/rose-2.jpg"]) == [
        "rose.png", "rose-2.png", "Rose-3.png", "tulip.png", "no extension.png", "rose-2-2.png",
    ]


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_explain_command_writes_one_png_per_readable_input(trained_run: Path, photos: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    for sub in ("a", "b"):
        (inputs / sub).mkdir(parents=True)
        shutil.copy(sorted((photos / "red").iterdir())[0], inputs / sub / "same name.jpg")
    shutil.copy(sorted((photos / "blue").iterdir())[0], inputs / "blue.jpg")
    im.write_truncated_jpeg(inputs / "broken.jpg", keep=0.3)
    im.write_text_file(inputs / "notes.jpg")
    out = tmp_path / "heat"
    result = runner.invoke(app, ["explain", str(trained_run), str(inputs), "--out", str(out), "--json"])
    assert result.exit_code == 1, result.output  # unreadable files, as predict says
    rows = {Path(r["path"]).relative_to(inputs).as_posix(): r for r in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {"a/same name.jpg", "b/same name.jpg", "blue.jpg", "broken.jpg", "notes.jpg"}
    assert "corrupt" in rows["broken.jpg"]["error"] and "not an image" in rows["notes.jpg"]["error"]
    good = {k: r for k, r in rows.items() if "error" not in r}
    assert sorted(Path(r["png"]).name for r in good.values()) == ["blue.png", "same name-2.png", "same name.png"]
    assert sorted(p.name for p in out.iterdir()) == ["blue.png", "same name-2.png", "same name.png"]  # nothing else
    assert good["blue.jpg"]["label"] == "blue" and good["a/same name.jpg"]["label"] == "red"
    for r in good.values():
        assert 0 < r["probability"] <= 1 and r["target"] == r["label"]
        with Image.open(r["png"]) as png:
            assert png.format == "PNG" and png.size == (160, 160)
    blue = inputs / "blue.jpg"
    chosen = runner.invoke(app, ["explain", str(trained_run), str(blue), "--out", str(out), "--label", "red", "--json"])
    assert chosen.exit_code == 0, chosen.output
    row = json.loads(chosen.stdout)
    assert row["label"] == "blue" and row["target"] == "red" and row["target_probability"] < row["probability"]
    table = runner.invoke(app, ["explain", str(trained_run), str(blue), "--out", str(out)])
    assert table.exit_code == 0, table.output
    assert "heatmap" in table.stdout and "blue" in table.stdout and "%" in table.stdout


def test_explain_command_bad_inputs_are_one_line_errors(
    trained_run: Path, exported_onnx: Path, photos: Path, tmp_path: Path
) -> None:
    photo = str(sorted((photos / "red").iterdir())[0])
    out = str(tmp_path / "out")

    def explain(*args: str) -> str:
        return _one_line_error(runner.invoke(app, ["explain", *args]))

    assert "pass the run folder" in explain(str(exported_onnx), photo, "--out", out)
    assert "no finished model" in explain(str(photos), photo, "--out", out)
    assert "run folder not found" in explain(str(tmp_path / "nowhere"), photo, "--out", out)
    assert "file not found" in explain(str(trained_run), str(tmp_path / "missing.jpg"), "--out", out)
    assert "unknown class 'violet'" in explain(str(trained_run), photo, "--out", out, "--label", "violet")
    (tmp_path / "empty").mkdir()
    assert "no image files" in explain(str(trained_run), str(tmp_path / "empty"), "--out", out)
    (tmp_path / "taken").write_text("a file")
    assert "must be a folder" in explain(str(trained_run), photo, "--out", str(tmp_path / "taken"))
    assert not Path(out).exists(), "nothing written for refused commands"
