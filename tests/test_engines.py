"""Engines: every engine computes what torch computes, auto picks OpenVINO on a CPU, and a machine
without OpenVINO still trains, predicts and serves with torch."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import florist
from florist import engines
from florist.backbones import create_backbone
from florist.errors import FloristError, SettingError
from florist.features import (
    PIXELS,
    _ImageFiles,
    build_transform,
    extract_features,
    extract_views,
    feature_key,
    frozen_pass,
    normalize_pixels,
)
from florist.runfiles import MODEL_JSON
from florist.runtime import openvino_core

CPU_ENGINES = ["openvino", "onnxruntime"]
CPU = torch.device("cpu")


def photo_files(photos: Path) -> list[Path]:
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    assert len(files) >= 12
    return files


def fp32_classifier(run: Path):
    """The run's classifier on torch in fp32, what exports are checked against (its features may be bf16)."""
    classifier = florist.load(run, engine="torch")
    for b in classifier.backbones:
        b.bf16 = False
    return classifier


@pytest.fixture
def no_openvino(monkeypatch):
    """This process as on a machine where OpenVINO is not installed."""
    real = engines.engine_problem

    def problem(name: str) -> str | None:
        return "openvino does not load (ModuleNotFoundError: No module named 'openvino')" if name == "openvino" else real(name)

    monkeypatch.setattr(engines, "engine_problem", problem)


def test_auto_is_openvino_on_a_cpu_and_torch_on_an_accelerator():
    assert engines.resolve_engine("auto", CPU) == "openvino"
    assert engines.resolve_engine("auto", torch.device("cuda", 0)) == "torch"
    assert engines.resolve_engine("torch", torch.device("mps")) == "torch"


@pytest.mark.parametrize(
    ("name", "device", "message"),
    [
        ("tensorrt", CPU, "--engine must be one of auto, openvino, onnxruntime, torch, got 'tensorrt'"),
        ("openvino", torch.device("cuda", 0), "--engine 'openvino' runs on the CPU only; use --engine torch on cuda"),
        ("onnxruntime", torch.device("mps"), "runs on the CPU only"),
    ],
)
def test_bad_engines_are_refused(name, device, message):
    with pytest.raises(SettingError) as info:
        engines.resolve_engine(name, device)
    assert message in info.value.for_cli()


def test_without_openvino_auto_is_torch_and_asking_for_it_is_an_error(no_openvino, caplog):
    with caplog.at_level(logging.WARNING, logger="florist"):
        assert engines.resolve_engine("auto", CPU) == "torch"
    assert not caplog.records, "a missing optional engine is not worth a warning"
    with pytest.raises(SettingError, match="cannot run here: openvino does not load"):
        engines.resolve_engine("openvino", CPU)


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_each_engine_computes_the_backbone_as_torch_does(tiny_backbone, engine):
    x = torch.randn(5, *tiny_backbone.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = tiny_backbone.model(x).numpy()
    net = engines.compile_frozen(tiny_backbone.model, [x[:1]], engine)
    assert net.engine == engine
    got = net(x)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net(x[:2]), expected[:2], rtol=1e-4, atol=1e-5)  # any batch size


def test_openvino_bf16_is_close_but_not_fp32(tiny_backbone):
    x = torch.randn(4, *tiny_backbone.data_config["input_size"], generator=torch.Generator().manual_seed(1))
    fp32 = engines.compile_frozen(tiny_backbone.model, [x[:1]], "openvino")(x)
    bf16 = engines.compile_frozen(tiny_backbone.model, [x[:1]], "openvino", bf16=True)(x)
    scale = np.abs(fp32).max()
    assert np.abs(bf16 - fp32).max() < 0.1 * scale
    if "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert not np.array_equal(bf16, fp32), "the precision hint was not applied"


def test_a_compiled_network_follows_its_weights(tiny):
    backbone = create_backbone(tiny["backbone"], tiny["weights"])
    backbone.engine = "openvino"
    first = frozen_pass(backbone)
    assert frozen_pass(backbone) is first, "compiled once per network"
    x = torch.randint(0, 256, (2, *backbone.data_config["input_size"]), dtype=torch.uint8)  # it takes pixels
    before = first(x)
    with torch.no_grad():
        next(backbone.model.parameters()).mul_(1.5)  # as loading tuned weights or a training step does
    again = frozen_pass(backbone)
    assert again is not first
    assert not np.allclose(again(x), before, atol=1e-4)
    with torch.inference_mode():
        expected = backbone.model(normalize_pixels(x, backbone.data_config)).numpy()
    np.testing.assert_allclose(again(x), expected, rtol=1e-4, atol=1e-5)


def test_the_cache_key_names_the_engine_except_for_pixels(tiny):
    backbone = create_backbone(tiny["backbone"], tiny["weights"])
    keys = {}
    for engine in ("torch", *CPU_ENGINES):
        backbone.engine = engine
        keys[engine] = (feature_key(backbone), feature_key(backbone, "square" + PIXELS, part="pixels"))
    assert len({pooled for pooled, _ in keys.values()}) == 3
    assert len({pixels for _, pixels in keys.values()}) == 1


def test_every_view_is_made_from_one_decode(tiny_backbone, photos, monkeypatch):
    import florist.features as features

    paths = photo_files(photos)[:6]
    calls = []
    real = features.load_for_backbone
    monkeypatch.setattr(features, "load_for_backbone", lambda *a: calls.append(1) or real(*a))
    views = ["clean", "flip", "aug0", "aug1"]
    together = extract_views(tiny_backbone, paths, views, seed=3, workers=0)
    assert len(calls) == len(paths), "one decode per photo for all four views"
    for view in views:
        alone = extract_features(tiny_backbone, paths, view=view, seed=3, workers=0)
        np.testing.assert_array_equal(together[view].features, alone.features)
        assert together[view].computed == len(paths)


@pytest.mark.parametrize("view", ["clean", "flip", "aug0"])
def test_uint8_views_finish_bit_for_bit_as_the_float_transform(tiny_backbone, photos, view):
    from PIL import Image

    config = tiny_backbone.data_config
    image = Image.open(photo_files(photos)[0]).convert("RGB")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        as_float = build_transform(config, view)(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        pixels = build_transform(config, view + PIXELS)(image)
    assert pixels.dtype == torch.uint8
    assert torch.equal(normalize_pixels(pixels[None], config)[0], as_float)


def test_a_bad_file_gives_blank_views_and_its_error(tiny_backbone, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    index, pixels, sha, error = _ImageFiles([str(bad)], tiny_backbone.data_config, ["clean", "aug0"])[0]
    assert index == 0 and sha == "" and "not an image" in error
    assert len(pixels) == 2 and all(p.dtype == torch.uint8 and not p.any() for p in pixels)


def test_engine_is_stored_and_keys_the_cache(photos, tmp_path, tiny):
    runs = {}
    for engine in ("torch", "openvino"):
        runs[engine] = tmp_path / engine
        florist.train(
            photos, runs[engine], mode="head", epochs=3, engine=engine, precision="fp32", cache_dir=tmp_path / "c", **tiny
        )
        bundle = json.loads((runs[engine] / MODEL_JSON).read_text())
        assert bundle["engine"] == engine and bundle["train_config"]["engine"] == engine
        metrics = json.loads((runs[engine] / "metrics.json").read_text())
        assert metrics["features_computed"] > 0, "an engine never reads another engine's features"
    images = photo_files(photos)
    probs = {e: florist.load(run).predict_proba(images)[0] for e, run in runs.items()}
    assert florist.load(runs["openvino"]).backbone.engine == "openvino"
    # fp32 features agree to float rounding, so the two heads train to nearly the same weights
    np.testing.assert_allclose(probs["openvino"], probs["torch"], atol=1e-3)
    assert (probs["openvino"].argmax(1) == probs["torch"].argmax(1)).all()
    overridden = florist.load(runs["openvino"], engine="torch")
    assert overridden.backbone.engine == "torch"
    np.testing.assert_allclose(overridden.predict_proba(images)[0], probs["openvino"], atol=1e-4)


def test_without_openvino_a_run_trains_on_torch_and_an_openvino_run_still_loads(
    trained_run, photos, tmp_path, tiny, no_openvino, caplog
):
    model = florist.train(photos, tmp_path / "run", mode="head", epochs=2, **tiny)
    assert model.backbone.engine == "torch"
    assert json.loads((tmp_path / "run" / MODEL_JSON).read_text())["engine"] == "torch"
    with caplog.at_level(logging.WARNING, logger="florist"):
        loaded = florist.load(trained_run)  # trained where OpenVINO ran
    assert json.loads((trained_run / MODEL_JSON).read_text())["engine"] == "openvino"
    assert loaded.backbone.engine == "torch"
    assert any("cannot run here" in r.getMessage() for r in caplog.records)
    with pytest.raises(SettingError, match="cannot run here"):
        florist.train(photos, tmp_path / "ov", mode="head", engine="openvino", **tiny)
    assert not (tmp_path / "ov").exists()


def test_onnxruntime_refuses_bf16_and_computes_fp32(photos, tmp_path, tiny):
    with pytest.raises(SettingError) as info:
        florist.train(photos, tmp_path / "a", mode="head", engine="onnxruntime", precision="bf16", **tiny)
    assert info.value.for_cli().startswith("--precision bf16 needs --engine openvino or --engine torch")
    model = florist.train(photos, tmp_path / "b", mode="head", epochs=2, engine="onnxruntime", **tiny)
    assert model.backbone.engine == "onnxruntime" and model.backbone.bf16 is False


def test_the_server_graph_agrees_on_every_engine(trained_run, photos):
    from florist.export import GraphClassifier

    classifier = fp32_classifier(trained_run)
    images = [p.read_bytes() for p in photo_files(photos)[::4]]
    answers = {}
    for engine in ("torch", *CPU_ENGINES):
        model = GraphClassifier(classifier, engine)
        answers[model.backend] = model.probabilities_of([model.arrays(b) for b in images])
    assert set(answers) == {"pytorch", "openvino", "onnxruntime"}
    for probs in answers.values():
        np.testing.assert_allclose(probs, answers["pytorch"], atol=1e-4)


def test_openvino_export_predicts_like_the_run_without_torch(trained_run, photos, tmp_path):
    from florist.export import export

    out = tmp_path / "model.xml"
    report = export(trained_run, out, format="openvino", check_images=4)
    assert report.max_abs_diff <= 1e-4 and out.is_file() and out.with_suffix(".bin").is_file()
    images = photo_files(photos)
    exported = florist.load(out)
    assert exported.backend == "openvino"
    run = fp32_classifier(trained_run)
    np.testing.assert_allclose(exported.predict_proba(images)[0], run.predict_proba(images)[0], atol=1e-4)
    script = (
        "import sys, florist; m = florist.load(sys.argv[1]); m.predict(sys.argv[2:], top_k=1); "
        "assert 'torch' not in sys.modules, 'an exported model needs no torch'"
    )
    subprocess.run([sys.executable, "-c", script, str(out), str(images[0])], check=True, timeout=120)


def test_openvino_export_bad_names_and_files(trained_run, tmp_path):
    from florist.export import export

    with pytest.raises(SettingError, match="name the .xml file"):
        export(trained_run, tmp_path / "model.bin", format="openvino")
    broken = tmp_path / "broken.xml"
    broken.write_text("<net>")
    broken.with_suffix(".bin").write_bytes(b"")
    with pytest.raises(FloristError, match="cannot load .* as an OpenVINO model: not XML"):
        florist.load(broken)
    broken.write_text('<?xml version="1.0"?><html/>')
    with pytest.raises(FloristError, match="its root element is <html>, not <net>"):
        florist.load(broken)
    with pytest.raises(FloristError, match="model files not found"):
        florist.load(tmp_path / "absent.xml")


def test_openvino_models_are_converted_once_per_machine_and_a_damaged_one_again(tiny_backbone, tmp_path, monkeypatch):
    import openvino as ov

    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path / "cache"))
    conversions = []
    real = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda *a, **k: conversions.append(1) or real(*a, **k))
    x = torch.rand(3, *tiny_backbone.data_config["input_size"])
    with torch.inference_mode():
        expected = tiny_backbone.model(x).numpy()
    first = engines.compile_frozen(tiny_backbone.model, [x[:1]], "openvino")
    cached = sorted((tmp_path / "cache" / "openvino").glob("*.xml"))
    assert len(conversions) == 1 and len(cached) == 1 and cached[0].with_suffix(".bin").is_file()
    again = engines.compile_frozen(tiny_backbone.model, [x[:1]], "openvino")
    assert len(conversions) == 1, "the cached model was used"
    np.testing.assert_allclose(again(x), first(x), rtol=1e-5, atol=1e-6)
    weights = cached[0].with_suffix(".bin")
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = bytes(64 * [0x7F])  # huge floats in the middle
    weights.write_bytes(bytes(damaged))
    repaired = engines.compile_frozen(tiny_backbone.model, [x[:1]], "openvino")
    assert len(conversions) == 2, "a cached model that disagrees with torch is converted again"
    np.testing.assert_allclose(repaired(x), expected, rtol=1e-4, atol=1e-5)
    cached[0].write_text("<net")  # unreadable: converted again, never an error
    engines.compile_frozen(tiny_backbone.model, [x[:1]], "openvino")
    assert len(conversions) == 3


def test_openvino_sends_no_usage_reports():
    """Importing OpenVINO's converter and converting each fork a Google Analytics reporter, unless told otherwise.

    Run in a fresh interpreter: this one imported OpenVINO long ago.
    """
    script = """
import multiprocessing.process, torch
started = []
multiprocessing.process.BaseProcess.start = lambda self: started.append(self)
from florist import engines
module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
model = engines.convert_openvino(module, [torch.zeros(1, 3, 8, 8)])
print(model.inputs[0].get_partial_shape().to_string(), len(started))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[?,3,8,8]", "0"]
