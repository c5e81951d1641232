"""Export to ONNX / TorchScript: parity with PyTorch, metadata, quantization, the torch-free path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import seeded_weights
from fastapi.testclient import TestClient

import florist
from florist.backbones import Backbone, create_backbone
from florist.bundle import Bundle, build_head, linear_head_spec, save_bundle, tuned_prefix
from florist.calibration import apply_temperature
from florist.data import read_manifest
from florist.ensemble import ensemble_head_spec
from florist.errors import FloristError
from florist.export import PARITY_TOLERANCE, export, read_torchscript_metadata
from florist.predict import Classifier
from florist.runtime import OnnxClassifier

SRC = Path(__file__).resolve().parents[1] / "src"


def fp32_run(
    photos: Path,
    run: Path,
    nets: Sequence[Backbone],
    tta: tuple[str, ...] = ("clean", "flip"),
    tuned: bool = False,
    ensemble: bool = False,
) -> Path:
    """A run folder with a seeded random head (fp32 features) on ``nets``, and manifests of ``photos``.

    ``tuned`` stores re-trained tensors for the first backbone's final conv, as tune-top does
    (for every backbone of an ``ensemble``: one head per backbone, each with its own temperature).
    The backbones are only read.
    """
    florist.prepare(photos, run, eval_fraction=0.25)
    if ensemble:
        members = [linear_head_spec(b.num_features, 3) for b in nets]
        spec = ensemble_head_spec(members, [0.6 + 0.5 * i for i in range(len(nets))], [1.0 + i for i in range(len(nets))])
    else:
        spec = linear_head_spec(sum(b.num_features for b in nets), 3)
    head = build_head(spec)
    torch.manual_seed(0)
    for module in head.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.1)
    state = dict(head.state_dict())
    generator = torch.Generator().manual_seed(1)
    for index, net in enumerate(nets[: len(nets) if ensemble else 1] if tuned else []):
        for key, value in net.model.state_dict().items():
            if key.startswith(("conv_head.", "bn2.")) and value.is_floating_point():
                state[tuned_prefix(index) + key] = value * (1 + 0.5 * torch.rand(value.shape, generator=generator))
    bundle = Bundle(
        ["blue", "green", "red"],
        [b.spec for b in nets],
        [b.data_config for b in nets],
        spec,
        state,
        tta_views=list(tta),
        bf16=False,
    )
    save_bundle(run, bundle)
    return run


def sample_files(photos: Path) -> list[Path]:
    return [sorted((photos / c).iterdir())[i] for c in ("red", "green", "blue") for i in (0, 5)]


def assert_matches_pytorch(exported: OnnxClassifier, reference: Classifier, files: list[Path]) -> np.ndarray:
    """ONNX Runtime on files == Classifier.predict_proba on the same files (fp32)."""
    got, errors = exported.predict_proba(files)
    expected, _ = reference.predict_proba(files)
    assert not errors
    diff = np.abs(got - expected).max()
    print(f"ONNX Runtime vs PyTorch Classifier: max abs probability diff {diff:.2e} on {len(files)} images")
    assert diff <= PARITY_TOLERANCE
    return got


def load_pair(run: Path, onnx_path: Path) -> tuple[OnnxClassifier, Classifier]:
    return OnnxClassifier(onnx_path), Classifier.from_bundle(florist.bundle.read_bundle(run))


def test_onnx_export_of_a_trained_run(exported_onnx: Path, photos: Path, tiny_backbone: Backbone) -> None:
    model = florist.load(exported_onnx)
    assert isinstance(model, OnnxClassifier)
    assert model.classes == ["blue", "green", "red"]
    assert [s.name for s in model.inputs] == ["pixels", "pixels_flip"]
    meta = model.metadata
    assert meta["precision"] == "fp32" and meta["tta_views"] == ["clean", "flip"]
    assert meta["inputs"][0]["preprocessing"]["input_size"] == tiny_backbone.data_config["input_size"]
    preds = model.predict([photos], top_k=2)
    assert len(preds) == 24 and [p.labels[0] for p in preds] == [Path(p.path).parent.name for p in preds]


@pytest.fixture(scope="module")
def fp32_export(photos: Path, tiny_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory):
    """An fp32 head-mode run of the tiny backbone with flip TTA, its export report, and both models loaded."""
    folder = tmp_path_factory.mktemp("fp32")
    run = fp32_run(photos, folder / "run", [tiny_backbone])
    report = export(run, folder / "m.onnx", check_images=6)
    return report, *load_pair(run, folder / "m.onnx")


def test_parity_with_pytorch_head_mode(fp32_export: tuple, photos: Path) -> None:
    report, exported, reference = fp32_export
    print(f"export check: max abs diff {report.max_abs_diff:.2e} on {report.check_images} images")
    assert report.check_source == "eval.csv" and report.check_images == 6
    assert report.max_abs_diff <= PARITY_TOLERANCE
    assert_matches_pytorch(exported, reference, sample_files(photos))


def test_parity_on_real_flowers(flower_photos: Path, photos: Path, tmp_path: Path) -> None:
    """The real network on real JPEGs of many sizes and aspect ratios."""
    run = fp32_run(photos, tmp_path / "run", [create_backbone("efficientnet_lite0")])
    export(run, tmp_path / "m.onnx", check_images=1)
    exported, reference = load_pair(run, tmp_path / "m.onnx")
    files = sorted(flower_photos.glob("*/*.jpg"))[::150]
    assert_matches_pytorch(exported, reference, files)


def test_dynamic_batch_axis(exported_onnx: Path, photos: Path) -> None:
    model = OnnxClassifier(exported_onnx)
    files = sorted((photos / "green").iterdir())[:5]
    together, _ = model.predict_proba(files)
    alone = np.concatenate([model.predict_proba([f])[0] for f in files])
    np.testing.assert_allclose(together, alone, atol=1e-6)


@pytest.mark.slow
def test_tune_top_tensors_are_exported(photos: Path, tiny_backbone: Backbone, tmp_path: Path) -> None:
    copied = shutil.copytree(photos, tmp_path / "photos")
    tuned = fp32_run(copied, tmp_path / "tuned", [tiny_backbone], tta=("clean",), tuned=True)
    shutil.rmtree(copied)  # the photos have moved: the parity check falls back to synthetic images
    report = export(tuned, tmp_path / "tuned.onnx", check_images=4)
    assert report.inputs == ["pixels"] and report.check_source == "synthetic"
    assert report.max_abs_diff <= PARITY_TOLERANCE
    files = sample_files(photos)
    got = assert_matches_pytorch(*load_pair(tuned, tmp_path / "tuned.onnx"), files)
    plain = fp32_run(photos, tmp_path / "plain", [tiny_backbone], tta=("clean",))
    untuned, _ = Classifier.from_bundle(florist.bundle.read_bundle(plain)).predict_proba(files)
    assert np.abs(got - untuned).max() > 1e-3  # the re-trained tensors changed the exported network


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Converting a tensor:torch.jit.TracerWarning")  # group norm's size check
def test_multi_backbone_export(photos: Path, tiny_backbone: Backbone, second_net: Backbone, tmp_path: Path) -> None:
    side = tiny_backbone.data_config["input_size"][-1]
    run = fp32_run(photos, tmp_path / "run", [tiny_backbone, second_net])
    report = export(run, tmp_path / "two.onnx", check_images=3)
    assert report.inputs == ["pixels_0", "pixels_flip_0", "pixels_1", "pixels_flip_1"]
    model = OnnxClassifier(tmp_path / "two.onnx")
    assert [s.data_config["input_size"][-1] for s in model.inputs] == [side, side, 192, 192]
    assert_matches_pytorch(
        model, Classifier.from_bundle(florist.bundle.read_bundle(run)), sample_files(photos)[:3]
    )


@pytest.fixture
def second_net(tmp_path: Path) -> Backbone:
    """A second tiny backbone (group norms), given 192 px so that mixing up the inputs' sizes shows."""
    gn = "test_efficientnet_gn"
    second = create_backbone(gn, seeded_weights(gn, tmp_path / f"{gn}.safetensors"))
    second.data_config["input_size"] = [3, 192, 192]
    return second


@pytest.mark.filterwarnings("ignore:Converting a tensor:torch.jit.TracerWarning")  # group norm's size check
def test_ensemble_combines_calibrated_members_in_predict_export_and_serve(
    photos: Path, tiny_backbone: Backbone, second_net: Backbone, tmp_path: Path
) -> None:
    """An ensemble bundle: each member's head on its own backbone's (tuned) features, calibrated and weighed."""
    from florist.export import GraphClassifier
    from florist.features import extract_concat
    from florist.serve import create_app

    run = fp32_run(photos, tmp_path / "run", [tiny_backbone, second_net], tuned=True, ensemble=True)
    model = Classifier.from_bundle(florist.bundle.read_bundle(run))
    assert [b.tuned_id is not None for b in model.backbones] == [True, True]
    files = sample_files(photos)
    probs, errors = model.predict_proba(files)
    assert not errors and np.allclose(probs.sum(1), 1, atol=1e-5)
    # The same by hand: member i's head on backbone i's features, view-averaged, its temperature, its weight.
    head = model.head
    expected = 0
    for i, backbone in enumerate(model.backbones):
        views = extract_concat([backbone], files, ["clean", "flip"])
        with torch.no_grad():
            member = np.mean([head.members[i](torch.from_numpy(v.features)).softmax(1).numpy() for v in views.values()], 0)
        expected = expected + head.weights[i] * apply_temperature(member, head.temperatures[i])
    assert head.weights == pytest.approx([1 / 3, 2 / 3])
    np.testing.assert_allclose(probs, expected, atol=1e-5)

    report = export(run, tmp_path / "ensemble.onnx", check_images=3)
    assert report.inputs == ["pixels_0", "pixels_flip_0", "pixels_1", "pixels_flip_1"]
    assert report.max_abs_diff <= PARITY_TOLERANCE
    assert_matches_pytorch(OnnxClassifier(tmp_path / "ensemble.onnx"), model, files)
    with TestClient(create_app(GraphClassifier(model, engine="torch"))) as client:
        answer = client.post("/predict", files={"file": ("x.jpg", files[0].read_bytes())}).json()
    assert answer["probability"] == pytest.approx(float(probs[0].max()), abs=1e-4)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated upstream, still what C++ loads
def test_torchscript_export(trained_run: Path, exported_onnx: Path, photos: Path, tmp_path: Path) -> None:
    report = export(trained_run, tmp_path / "m.pt", format="torchscript", check_images=3)
    assert report.max_abs_diff <= PARITY_TOLERANCE
    meta = read_torchscript_metadata(tmp_path / "m.pt")
    assert meta["classes"] == ["blue", "green", "red"]
    onnx_model = OnnxClassifier(exported_onnx)
    arrays = onnx_model.arrays(sorted((photos / "red").iterdir())[0].read_bytes())
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.inference_mode():
        probs = scripted(*(torch.from_numpy(arrays[s.name][None]) for s in onnx_model.inputs)).numpy()
    np.testing.assert_allclose(probs, onnx_model.probabilities_of([arrays]), atol=PARITY_TOLERANCE)


@pytest.mark.slow
def test_quantized_export_reports_its_top1_change(
    trained_run: Path, exported_onnx: Path, tmp_path: Path
) -> None:
    report = export(trained_run, tmp_path / "int8.onnx", quantize="int8", check_images=2)
    e = report.evaluation
    assert e["n"] == 6  # the run's eval split
    assert e["top1_change"] == pytest.approx(e["top1_export"] - e["top1_run"])
    assert 0.0 <= e["agreement"] <= 1.0 and report.fp32_max_abs_diff <= PARITY_TOLERANCE
    assert report.size_bytes < exported_onnx.stat().st_size / 2
    model = OnnxClassifier(tmp_path / "int8.onnx")
    assert model.metadata["precision"] == "int8"
    items = read_manifest(trained_run / "eval.csv", model.classes)
    truth = [it.label for it in items]
    probs, _ = model.predict_proba([it.path for it in items])
    assert e["top1_export"] == pytest.approx(np.mean(probs.argmax(1) == truth))
    run_probs, _ = florist.load(trained_run).predict_proba([it.path for it in items])
    assert e["top1_run"] == pytest.approx(np.mean(run_probs.argmax(1) == truth))
    assert e["agreement"] == pytest.approx(np.mean(run_probs.argmax(1) == probs.argmax(1)))


def test_export_errors(trained_run: Path, exported_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(FloristError, match="run folder not found"):
        export(tmp_path / "missing", tmp_path / "m.onnx")
    with pytest.raises(FloristError, match="quantize 'int8' is not offered for format='torchscript'") as caught:
        export(trained_run, tmp_path / "m.pt", format="torchscript", quantize="int8")
    assert caught.value.for_cli().startswith("--quantize 'int8' is not offered for --format torchscript")
    with pytest.raises(FloristError, match="quantize 'fp16' is not offered for format='onnx'"):
        export(trained_run, tmp_path / "m.onnx", quantize="fp16")
    with pytest.raises(FloristError, match="format must be one of"):
        export(trained_run, tmp_path / "m.mlmodel", format="coreml")
    with pytest.raises(FloristError, match="already an exported model"):
        export(exported_onnx, tmp_path / "again.onnx")
    assert not list(tmp_path.iterdir())


def test_loading_bad_onnx_files(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(FloristError, match="model file not found"):
        florist.load(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(FloristError, match="cannot load"):
        florist.load(tmp_path / "junk.onnx")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "foreign.onnx")
    with pytest.raises(FloristError, match="no florist metadata"):
        florist.load(tmp_path / "foreign.onnx")


NO_TORCH = """
import sys

class NoTorch:  # as if torch, torchvision and timm were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTorch())
model, folder, photo = sys.argv[1:]

from fastapi.testclient import TestClient
from florist.cli import main
from florist.serve import create_app, load_model

with TestClient(create_app(load_model(model))) as client:
    answer = client.post("/predict", content=open(photo, "rb").read()).json()
    print("served", answer["label"], file=sys.stderr)
sys.argv = ["florist", "predict", model, folder, "--json"]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
assert not any(m.split(".")[0] in ("torch", "torchvision", "timm") for m in sys.modules)
"""


def assert_predicts_and_serves_without_torch(model: Path, photos: Path, tmp_path: Path) -> None:
    """`florist predict MODEL` and the server on it, in a process where importing torch fails."""
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH)
    red = sorted((photos / "red").iterdir())[0]
    result = subprocess.run(
        [sys.executable, str(script), str(model), str(photos / "blue"), str(red)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "served red" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 8 and {line["label"] for line in lines} == {"blue"}


def test_onnx_predict_and_serve_need_no_torch(exported_onnx: Path, photos: Path, tmp_path: Path) -> None:
    assert_predicts_and_serves_without_torch(exported_onnx, photos, tmp_path)


def test_export_and_serve_from_the_command_line(trained_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from florist.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["export", str(trained_run), "--out", str(tmp_path / "m.onnx"), "--check-images", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "parity: max |fp32 export - PyTorch| probability" in result.output
    (tmp_path / "m.pt").write_bytes(b"a TorchScript archive, say")
    for args, message in [
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")], "run folder not found"),
        (["serve", str(tmp_path / "nope.onnx")], "model file not found"),
        (["predict", str(tmp_path / "m.pt"), str(tmp_path)], "expected a run folder or an exported .onnx"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
