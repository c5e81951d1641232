"""report.html, its plots, the eval predictions and the TensorBoard extras written at the end of training."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import MIXED_CLASSES as CLASSES
from PIL import Image
from typer.testing import CliRunner

import florist
from florist.cli import app
from florist.files import read_csv
from florist.report import HEATMAPS, ConfusionFigure, confused_pairs, find_chromium, screenshot, write_report

runner = CliRunner()
def _page(run: Path) -> str:
    return (run / "report.html").read_text(encoding="utf-8")


def test_training_writes_the_report_and_its_plots(mixed_run: Path) -> None:
    page = _page(mixed_run)
    for name in CLASSES:
        assert f"<td>{html.escape(name)}</td>" in page, name  # a row of the per-class table
    assert "x<y & z" not in page  # escaped everywhere
    for png in ("confusion_matrix.png", "curves.png"):
        with Image.open(mixed_run / png) as img:
            assert img.format == "PNG" and img.width > 300
    embedded = base64.b64encode((mixed_run / "confusion_matrix.png").read_bytes()).decode()
    assert f'alt="confusion matrix" src="data:image/png;base64,{embedded}"' in page
    assert 'src="http' not in page and 'href="http' not in page  # self-contained


def test_gallery_shows_each_misclassified_eval_image(mixed_run: Path) -> None:
    rows = read_csv(mixed_run / "eval_predictions.csv")
    metrics = json.loads((mixed_run / "metrics.json").read_text())
    assert len(rows) == metrics["n_eval"]
    assert np.mean([r["label"] == r["predicted"] for r in rows]) == pytest.approx(metrics["top1"])
    wrong = [r for r in rows if r["label"] != r["predicted"]]
    assert wrong, "the two grey classes should be confused"
    page = _page(mixed_run)
    assert f"Misclassified eval images ({len(wrong)})" in page
    gallery = page[page.index('id="misclassified"') : page.index('id="duplicates"')]
    gallery = gallery.split('id="label-issues"')[0]  # the suspect labels' thumbnails come after
    assert gallery.count('src="data:image/jpeg;base64,') == len(wrong) + min(len(wrong), HEATMAPS)  # thumbnail, heatmap
    data_dir = json.loads((mixed_run / "run.json").read_text())["data_dir"]
    for r in wrong:
        assert html.escape(str(Path(r["path"]).relative_to(data_dir))) in page
        predicted = html.escape(r["predicted"])
        assert f'predicted <span class="pred">{predicted}</span> ({float(r["probability"]):.0%})' in page


def test_misclassified_images_get_a_heatmap_of_the_wrong_answer(mixed_run: Path) -> None:
    wrong = [r for r in read_csv(mixed_run / "eval_predictions.csv") if r["label"] != r["predicted"]]
    heat = re.findall(r'<img class="heatmap" alt="heatmap of ([^"]*) in [^"]*" src="data:image/jpeg;base64,([^"]+)"', _page(mixed_run))
    assert len(heat) == min(len(wrong), HEATMAPS) > 0
    by_confidence = sorted(wrong, key=lambda r: -float(r["probability"]))
    assert [html.unescape(label) for label, _ in heat] == [r["predicted"] for r in by_confidence[: len(heat)]]
    side = json.loads((mixed_run / "model.json").read_text())["preprocessing"][0]["input_size"][-1]
    for _, data in heat:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "JPEG" and image.size == (side, side)
            assert np.asarray(image.convert("RGB")).std() > 5  # a picture, not a blank


def test_a_report_without_heatmaps_when_they_cannot_be_computed(
    mixed_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from florist.explain import Explainer

    def refuse(run: Path) -> Explainer:
        raise RuntimeError("no gradients today")

    run = tmp_path / "copy"
    shutil.copytree(mixed_run, run)
    monkeypatch.setattr(Explainer, "from_run", refuse)
    with caplog.at_level("WARNING", logger="florist"):
        page = write_report(run).read_text(encoding="utf-8")
    assert "report.html has no heatmaps: no gradients today" in caplog.text
    assert 'class="heatmap"' not in page and "Misclassified eval images" in page
    assert page.count('src="data:image/jpeg;base64,') == len(re.findall(r'<figure>', page))  # thumbnails only


def test_skipped_files_and_confused_pairs_are_listed(mixed_run: Path) -> None:
    page = _page(mixed_run)
    assert "Skipped files (1)" in page and "red/broken.jpg" in page and "not an image" in page
    metrics = json.loads((mixed_run / "metrics.json").read_text())
    top = confused_pairs(metrics["confusion_matrix"], metrics["classes"])[0]
    assert {top["true"], top["predicted"]} == {"grey one", "x<y & z"}
    assert f"<tr><td>{html.escape(top['true'])}</td><td>{html.escape(top['predicted'])}</td>" in page


def test_confused_pairs_are_sorted_largest_first() -> None:
    pairs = confused_pairs([[5, 1, 0], [3, 2, 0], [0, 2, 4]], ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("b", "a", 3),
        ("c", "b", 2),
        ("a", "b", 1),
    ]
    assert pairs[0]["share"] == pytest.approx(0.6)


def test_report_command_regenerates_and_recomputes_missing_predictions(
    mixed_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "copy"
    shutil.copytree(mixed_run, run)
    before = read_csv(run / "eval_predictions.csv")
    for name in ("report.html", "confusion_matrix.png", "curves.png", "eval_predictions.csv"):
        (run / name).unlink()
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run / "report.html")
    after = read_csv(run / "eval_predictions.csv")  # computed again with the saved model
    assert [r["path"] for r in after] == [r["path"] for r in before]
    probs = [[float(r[k]) for k in r if k.startswith("p:")] for r in (before, after) for r in r]
    half = len(probs) // 2
    np.testing.assert_allclose(probs[:half], probs[half:], atol=1e-4)
    assert _page(run).count('src="data:image/jpeg;base64,') == _page(mixed_run).count(
        'src="data:image/jpeg;base64,'
    )


def test_report_needs_a_finished_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "no finished model" in result.output


def test_run_without_eval_split(photos: Path, tmp_path: Path, tiny: dict[str, str]) -> None:
    run = tmp_path / "run"
    florist.train(photos, run, epochs=2, eval_fraction=0.0, **tiny)
    page = _page(run)
    assert "No eval split in this run" in page and (run / "curves.png").is_file()
    assert not (run / "confusion_matrix.png").exists() and not (run / "eval_predictions.csv").exists()


def test_tensorboard_gets_confusion_matrix_inputs_and_hparams(mixed_run: Path, tiny_backbone) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(mixed_run / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"eval/confusion_matrix", "final/confusion_matrix", "inputs/clean", "inputs/flip"} <= set(tags["images"])
    assert {"loss/train", "top1/eval", "hparam/top1"} <= set(tags["scalars"])
    inputs = events.Images("inputs/clean")[0]
    side = tiny_backbone.data_config["input_size"][-1]  # 160
    assert (inputs.width, inputs.height) == (side * 8, side)  # 8 training images side by side
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")
    epochs = json.loads((mixed_run / "metrics.json").read_text())["history"]["step"]
    assert len(epochs) > 1
    assert [m.step for m in events.Images("eval/confusion_matrix")] == epochs  # one per eval, as it trains
    assert [m.step for m in events.Images("final/confusion_matrix")] == epochs[-1:]  # the kept weights


@pytest.mark.skipif(
    find_chromium() is None, reason="chromium not installed (Debian: apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(mixed_run: Path, tmp_path: Path) -> None:
    png = screenshot(mixed_run / "report.html", tmp_path / "report.png", width=1280, height=2000)
    with Image.open(png) as img:
        assert img.size == (1280, 2000)
        pixels = np.asarray(img.convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 500, "the page rendered blank or without its plots"
    # The confusion matrix's darkest blue (a full diagonal cell) is on the page.
    dark_blue = (pixels[..., 2] > 80) & (pixels[..., 0] < 20) & (pixels[..., 1] < 70)
    assert dark_blue.sum() > 500


def test_a_refilled_confusion_figure_looks_like_a_fresh_one() -> None:
    """TensorBoard's per-eval matrices redraw only what changes; the result must match a full drawing."""
    classes = ["daisy", "dandelion", "roses"]
    rng = np.random.default_rng(0)
    figure = ConfusionFigure(classes)
    for _ in range(3):  # earlier matrices must leave no trace
        figure.draw(rng.integers(0, 50, (3, 3)).tolist()).rgb()
    matrix = rng.integers(0, 50, (3, 3)).tolist()
    refilled = figure.draw(matrix).rgb().astype(int)
    fresh = ConfusionFigure(classes).draw(matrix)
    fresh.figure.canvas.draw()
    drawn = np.asarray(fresh.figure.canvas.buffer_rgba())[..., :3].astype(int)
    assert refilled.shape == drawn.shape
    diff = np.abs(refilled - drawn).max(axis=2)
    # cell edges may land a sub-pixel apart; a stale count or cell would differ by far more
    assert diff.max() <= 40 and (diff > 8).mean() < 0.02
    assert figure.png() == fresh.png()  # and the report's PNG is the complete plot either way
