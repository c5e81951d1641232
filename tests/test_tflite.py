"""TFLite export (florist.tflite): one uint8-image-in, probabilities-out file that LiteRT and MediaPipe run."""

from __future__ import annotations

import importlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import assert_predicts_and_serves_without_torch, fp32_run, sample_files

import florist
from florist.backbones import Backbone
from florist.bundle import read_bundle
from florist.data import read_manifest
from florist.errors import FloristError
from florist.export import PARITY_TOLERANCE, export
from florist.predict import Classifier
from florist.preprocess import model_inputs
from florist.tflite import INPUT_NAME, LABELS_FILE, TFLiteClassifier, image_preprocessing, require


def run_probabilities(run: Path, files: list[Path]) -> np.ndarray:
    probs, errors = Classifier.from_bundle(read_bundle(run)).predict_proba(files)
    assert not errors
    return probs


@pytest.fixture(scope="module")
def exported_tflite(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, florist.export.ExportReport]:
    """:func:`trained_run` exported to fp32 TFLite, and its report (read-only by convention)."""
    path = tmp_path_factory.mktemp("tflite") / "colours.tflite"
    return path, export(trained_run, path, format="tflite", check_images=4)


def test_the_file_takes_a_uint8_image_and_gives_probabilities(exported_tflite: tuple, trained_run: Path) -> None:
    path, report = exported_tflite
    model = florist.load(path)
    assert isinstance(model, TFLiteClassifier)
    assert model.classes == read_bundle(trained_run).classes
    size = model.inputs[0].data_config["input_size"]
    details = model.run.interpreter.get_input_details()
    assert [d["name"] for d in details] and len(details) == 1
    assert details[0]["dtype"] == np.uint8 and list(details[0]["shape"]) == [1, size[1], size[2], 3]
    assert list(model.run.interpreter.get_output_details()[0]["shape"]) == [1, len(model.classes)]
    assert report.inputs == [INPUT_NAME] and report.max_abs_diff <= PARITY_TOLERANCE
    with zipfile.ZipFile(path) as files:  # associated files, after the flatbuffer
        assert files.read(LABELS_FILE).decode().split() == model.classes
        meta = json.loads(files.read("florist.json"))
    assert meta["precision"] == "fp32" and meta["inputs"][0]["dtype"] == "uint8"
    assert "mean" not in meta["inputs"][0]["preprocessing"]  # normalised inside the graph


def test_a_run_with_only_the_clean_view_gives_the_same_probabilities(
    photos: Path, tiny_backbone: Backbone, tmp_path: Path
) -> None:
    run = fp32_run(photos, tmp_path / "run", [tiny_backbone], tta=("clean",), tuned=True)
    report = export(run, tmp_path / "m.tflite", format="tflite", check_images=3)
    files = sample_files(photos)
    got, errors = florist.load(tmp_path / "m.tflite").predict_proba(files)
    assert not errors
    diff = np.abs(got - run_probabilities(run, files)).max()
    print(f"TFLite vs PyTorch Classifier (clean view, tuned tensors): max abs diff {diff:.2e}")
    assert diff <= PARITY_TOLERANCE
    assert report.evaluation["agreement"] == 1.0


def test_the_flip_view_mirrors_the_crop_and_stays_close(photos: Path, tiny_backbone: Backbone, tmp_path: Path) -> None:
    """The run mirrors the photo before cropping, the file mirrors the crop: at most a pixel column apart."""
    run = fp32_run(photos, tmp_path / "run", [tiny_backbone], tta=("clean", "flip"))
    export(run, tmp_path / "m.tflite", format="tflite", check_images=3)
    files = sample_files(photos)
    got, _ = florist.load(tmp_path / "m.tflite").predict_proba(files)
    expected = run_probabilities(run, files)
    diff = np.abs(got - expected).max()
    print(f"TFLite vs PyTorch Classifier (clean + flip views): max abs diff {diff:.2e}")
    assert 0 < diff < 0.01
    assert (got.argmax(1) == expected.argmax(1)).all()


def mediapipe_labels(path: Path, files: list[Path]) -> list[str]:
    """The top class MediaPipe's ImageClassifier gives each file, with its own preprocessing."""
    from mediapipe import Image as MPImage
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=1)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        return [
            classifier.classify(MPImage.create_from_file(str(f))).classifications[0].categories[0].category_name
            for f in files
        ]


def test_mediapipe_reads_the_labels_and_agrees(exported_tflite: tuple, photos: Path) -> None:
    """MediaPipe's ImageClassifier takes the file as it is: its metadata names the classes."""
    path, _ = exported_tflite
    files = sample_files(photos)
    ours = [p.labels[0] for p in florist.load(path).predict(files, top_k=1)]
    assert mediapipe_labels(path, files) == ours and set(ours) == {"red", "green", "blue"}


@pytest.mark.parametrize("how", ["fp16", "int8"])
def test_quantized_files_report_their_eval_top1(
    how: str, trained_run: Path, exported_tflite: tuple, tmp_path: Path
) -> None:
    fp32_path, _ = exported_tflite
    report = export(trained_run, tmp_path / f"{how}.tflite", format="tflite", quantize=how, check_images=2)
    assert report.quantize == how and report.fp32_max_abs_diff <= PARITY_TOLERANCE
    assert report.size_bytes < fp32_path.stat().st_size * 0.7
    model = TFLiteClassifier(tmp_path / f"{how}.tflite")
    assert model.metadata["precision"] == how
    items = read_manifest(trained_run / "eval.csv", model.classes)
    probs, _ = model.predict_proba([it.path for it in items])
    assert np.allclose(probs.sum(1), 1, atol=0.05) and (probs >= 0).all()  # int8: dequantized
    e = report.evaluation
    assert e["n"] == len(items)
    assert e["top1_export"] == pytest.approx(np.mean(probs.argmax(1) == [it.label for it in items]))
    assert any(f"{how} export" in line for line in report.summary())
    assert model.run.interpreter.get_output_details()[0]["dtype"] == np.float32  # as MediaPipe takes it
    files = [it.path for it in items]
    assert mediapipe_labels(tmp_path / f"{how}.tflite", files) == [p.labels[0] for p in model.predict(files, top_k=1)]


def test_bad_tflite_files_get_one_line_errors(exported_tflite: tuple, tmp_path: Path) -> None:
    path, _ = exported_tflite
    data = path.read_bytes()
    cases = {
        "missing.tflite": None,
        "text.tflite": b"not a model\n",
        "flatbuffer-only.tflite": data[: data.index(b"PK\x03\x04")],  # another tool's file: no florist metadata
        "truncated.tflite": data[: len(data) // 2],
    }
    expected = {
        "missing.tflite": "model file not found",
        "text.tflite": "no TFL3 flatbuffer header",
        "flatbuffer-only.tflite": "has no florist metadata",
        "truncated.tflite": "has no florist metadata",
    }
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(FloristError, match=expected[name]) as caught:
            florist.load(tmp_path / name)
        assert "\n" not in str(caught.value)


def test_backbones_that_crop_differently_cannot_share_one_image() -> None:
    small = {"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    large = {**small, "input_size": [3, 260, 260]}
    assert image_preprocessing(model_inputs([small, {**small, "mean": [0.4] * 3}], ["clean"]))["input_size"][-1] == 224
    with pytest.raises(FloristError, match="resize and crop differently .*224x224, 260x260.*ONNX or OpenVINO"):
        image_preprocessing(model_inputs([small, large], ["clean", "flip"]))


def test_without_the_tflite_extra_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def without_litert(name: str, *args):
        if name.startswith("litert_torch"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_litert)
    with pytest.raises(FloristError, match=r"TFLite models need litert_torch: pip install 'florist\[tflite\]'"):
        require("litert_torch")


def test_export_and_predict_from_the_command_line(trained_run: Path, photos: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from florist.cli import app

    cli = CliRunner()
    out = tmp_path / "m.tflite"
    done = cli.invoke(app, ["export", str(trained_run), "--out", str(out), "--format", "tflite", "--quantize", "int8", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["quantize"] == "int8" and report["evaluation"]["n"] == 6
    done = cli.invoke(app, ["predict", str(out), str(photos / "red"), "--json", "--top-k", "1"])
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 8 and {row["label"] for row in rows} == {"red"}


def test_metadata_keeps_weights_stored_after_the_flatbuffer() -> None:
    """ai-edge-quantizer keeps the weights of files over 256 KB after the flatbuffer, at file offsets."""
    from ai_edge_litert import schema_py_generated as schema

    from florist import tflite

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 4096), torch.nn.Linear(4096, 3)).eval()
    image = torch.randint(0, 256, (1, 4, 4, 3), dtype=torch.uint8)
    module = torch.nn.Sequential(ToFloat(), net).eval()
    plain = tflite.quantize(tflite.convert(module, image), "fp16", lambda: [])
    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(plain, 0))
    assert any(b.offset > 1 for b in tree.buffers)  # the layout this test is about
    meta = {"classes": ["a", "b", "c"], "inputs": [{"preprocessing": {"input_size": [3, 4, 4]}}]}
    pixels = image.numpy()
    expected = tflite.TFLiteRunner(plain, "plain")(pixels)
    got = tflite.TFLiteRunner(tflite.with_metadata(plain, meta), "with metadata")(pixels)
    np.testing.assert_array_equal(got, expected)



class ToFloat(torch.nn.Module):
    """uint8 pixels -> [0, 1] floats, the first layer of a hand-made image model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255


def test_tflite_predict_and_serve_need_no_torch(exported_tflite: tuple, photos: Path, tmp_path: Path) -> None:
    assert_predicts_and_serves_without_torch(exported_tflite[0], photos, tmp_path)


def test_the_output_may_have_any_name(trained_run: Path, tmp_path: Path) -> None:
    """The evaluation loads a copy named for its format, not for what the user called the file."""
    report = export(trained_run, tmp_path / "model.bin", format="tflite", check_images=2)
    assert report.evaluation["n"] == 6
    assert TFLiteClassifier(tmp_path / "model.bin").classes == read_bundle(trained_run).classes
