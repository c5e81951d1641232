"""Stage 7, *export*: a run folder -> one model file (ONNX, TorchScript, OpenVINO or TFLite) that needs no florist.

The exported graph computes what :meth:`florist.predict.Classifier.predict_proba`
computes, from preprocessed pixels: every backbone (tuned tensors included), the
concatenated features, the head, the softmax and the average over the test-time
views. It has one input per backbone and view (``pixels``, ``pixels_flip``, see
:func:`florist.preprocess.model_inputs`) with a dynamic batch axis, and one output,
``probabilities``. Class names, inputs and their preprocessing travel in the
file's metadata (ONNX ``metadata_props["florist"]``; TorchScript extra file
``florist.json``; OpenVINO ``rt_info``). A TFLite file instead takes one uint8 image
(:class:`ImageGraph`, :mod:`florist.tflite`), as phones and MediaPipe feed it.

After writing, the export is checked on real images from the run's manifests:
the exported file and the PyTorch graph get the same preprocessed arrays, and
the largest difference between their probabilities is reported (and must stay
under :data:`PARITY_TOLERANCE` for fp32). A quantized file (``int8``: ONNX Runtime's
dynamic int8, or LiteRT's static int8; ``fp16``: LiteRT) and every TFLite file are also
evaluated against the run itself on its eval split (:func:`compare_on_eval`).
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import tflite
from .calibration import temperature_scaled
from .data import BadImage, Item, read_file, read_manifest
from .engines import compile_frozen, convert_openvino, supports_bf16, trace_onnx
from .ensemble import view_probabilities
from .errors import FloristError, SettingError, literal
from .files import atomic_write_bytes
from .loader import load, load_run
from .predict import Classifier
from .preprocess import ModelInput, image_arrays, model_inputs
from .progress import ProgressFn, only_errors_logged
from .runfiles import EVAL_CSV, TRAIN_CSV
from .runtime import (
    EXPORT_FORMAT,
    METADATA_KEY,
    OUTPUT_NAME,
    ArrayClassifier,
    OpenVINOClassifier,
    import_openvino,
)
from .version import __version__

log = logging.getLogger("florist")

FORMATS = ("onnx", "torchscript", "openvino", "tflite")
#: The quantizations each format offers (see :func:`export`).
QUANTIZE = {"onnx": ("int8",), "tflite": tflite.QUANTIZATIONS}
#: Largest allowed difference between exported (fp32) and PyTorch probabilities.
PARITY_TOLERANCE = 1e-4
#: Name of the metadata file inside a TorchScript archive.
TORCHSCRIPT_METADATA = "florist.json"


class ExportGraph(nn.Module):
    """Backbones + head + test-time average as one module: pixels in, probabilities out.

    ``forward`` takes one ``[N, 3, H, W]`` tensor per :class:`~florist.preprocess.ModelInput`,
    in :attr:`inputs` order (backbone by backbone, views in order). The views of one
    backbone go through it as one batch; the probabilities of each view are averaged
    (an ensemble averages each member's, calibrates and weighs them: :mod:`florist.ensemble`),
    then calibrated with the run's temperature (see :mod:`florist.calibration`).

    Attributes:
        bf16: run the backbones under bfloat16 autocast (as a run trained with
            ``--precision bf16`` computes its features); always off for export.
    """

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.nets = nn.ModuleList([b.model for b in classifier.backbones])
        self.head = classifier.head
        self.views = list(classifier.tta_views)
        self.inputs = model_inputs([b.data_config for b in classifier.backbones], self.views)
        self.temperature = classifier.temperature
        self.bf16 = False
        self.eval()

    def features(self, *pixels: torch.Tensor) -> torch.Tensor:
        """Every backbone's pooled features side by side, ``[views * N, features]`` view by view."""
        n_views = len(self.views)
        features = []
        for b, net in enumerate(self.nets):
            views = pixels[b * n_views : (b + 1) * n_views]
            x = torch.cat(views) if n_views > 1 else views[0]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                features.append(net(x).float())
        return torch.cat(features, dim=1) if len(features) > 1 else features[0]

    def logits(self, *pixels: torch.Tensor) -> torch.Tensor:
        """The head's outputs before the softmax, ``[views * N, classes]`` view by view (what Grad-CAM differentiates)."""
        return self.head(self.features(*pixels)).float()

    def forward(self, *pixels: torch.Tensor) -> torch.Tensor:
        features = self.features(*pixels)
        views = features.chunk(len(self.views)) if len(self.views) > 1 else [features]  # LiteRT lowers no 1-way split
        return temperature_scaled(view_probabilities(self.head, views), self.temperature)


class ImageGraph(nn.Module):
    """An :class:`ExportGraph` behind one uint8 ``[N, H, W, 3]`` image: the graph of a TFLite export.

    Normalisation and the flip view happen inside. The flip view mirrors the centre crop,
    where training mirrored the photo before cropping: the same pixels, or one column off
    when the crop's margin is odd; the eval-split agreement of :func:`export` measures
    what that costs.
    """

    def __init__(self, graph: ExportGraph):
        super().__init__()
        self.body = graph  # not `graph`: torch.export's GraphModule has its own attribute of that name
        self.inputs = [tflite.image_input(graph.inputs)]
        mean = torch.tensor([s.data_config["mean"] for s in graph.inputs], dtype=torch.float32)
        std = torch.tensor([s.data_config["std"] for s in graph.inputs], dtype=torch.float32)
        # (x / 255 - mean) / std as one multiply-add per input: [inputs, 1, 3, 1, 1]
        self.register_buffer("scale", (1 / (255 * std)).reshape(-1, 1, 3, 1, 1))
        self.register_buffer("shift", (mean / std).reshape(-1, 1, 3, 1, 1))
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()
        pixels = []
        for i, spec in enumerate(self.body.inputs):
            p = x * self.scale[i] - self.shift[i]
            pixels.append(p.flip(3) if spec.view == "flip" else p)
        return self.body(*pixels)


class GraphClassifier(ArrayClassifier):
    """A run folder's :class:`ExportGraph` on one engine: the server's back end for run folders.

    It takes the same preprocessed arrays as an exported file, so the back ends differ
    only in the engine. Features are computed in bf16 when the run's were.

    Args:
        classifier: the run's classifier (from :func:`florist.loader.load_run`).
        engine: ``torch``, ``openvino`` or ``onnxruntime`` (default: the one the run's
            features were computed with; see :mod:`florist.engines`).
    """

    def __init__(self, classifier: Classifier, engine: str | None = None):
        self.graph = ExportGraph(classifier)
        engine = engine or classifier.backbone.engine
        bf16 = any(b.bf16 for b in classifier.backbones) and supports_bf16(engine)
        self.graph.bf16 = bf16 and engine == "torch"  # the other engines are told the precision itself
        example = [torch.zeros(1, *s.data_config["input_size"]) for s in self.graph.inputs]
        self.net = compile_frozen(self.graph, example, engine, bf16=bf16 and engine != "torch")
        self.backend = BACKENDS[engine]
        self.classes = list(classifier.classes)
        self.inputs = self.graph.inputs
        self.tta_views = self.graph.views
        self.ood_net, self.ood = None, classifier.ood
        if classifier.ood is not None:
            self.has_ood, self.ood_threshold = True, classifier.ood_threshold
            self.ood_inputs = [s for s in self.inputs if s.view == "clean"]
            ood_graph = ReferenceGraph(classifier)
            ood_graph.bf16 = self.graph.bf16
            clean = [torch.zeros(1, *s.data_config["input_size"]) for s in self.ood_inputs]
            self.ood_net = compile_frozen(ood_graph, clean, engine, bf16=bf16 and engine != "torch")

    def probabilities(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.net(*(torch.from_numpy(batch[s.name]) for s in self.inputs))

    def ood_scores(self, batch: dict[str, np.ndarray]) -> np.ndarray | None:
        if self.ood_net is None or self.ood is None:
            return None
        return self.ood.score(self.ood_net(*(torch.from_numpy(batch[s.name]) for s in self.ood_inputs)))


class ReferenceGraph(nn.Module):
    """The pretrained backbones on the clean view, features concatenated: what the run's detector scores."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.nets = nn.ModuleList([b.model for b in classifier.reference])
        self.bf16 = False
        self.eval()

    def forward(self, *pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            features = [net(x).float() for net, x in zip(self.nets, pixels)]
        return torch.cat(features, dim=1) if len(features) > 1 else features[0]


#: What the server reports as its back end, by engine.
BACKENDS = {"torch": "pytorch", "openvino": "openvino", "onnxruntime": "onnxruntime"}


def export_metadata(classifier: Classifier, inputs: Sequence[ModelInput], precision: str) -> dict[str, Any]:
    """The ``florist`` metadata stored in an exported file: all a runtime needs besides the graph."""
    return {
        "format": EXPORT_FORMAT,
        "florist_version": __version__,
        "classes": list(classifier.classes),
        "inputs": [s.to_dict() for s in inputs],
        "output": OUTPUT_NAME,
        "tta_views": list(classifier.tta_views),
        "backbones": [b.spec.to_dict() for b in classifier.backbones],
        "head": classifier.bundle.head if classifier.bundle else None,
        "precision": precision,
    }


# ---------------------------------------------------------------------------
# Check images
# ---------------------------------------------------------------------------


@dataclass
class CheckBatch:
    """Preprocessed images the export is checked on, and where they came from."""

    arrays: dict[str, np.ndarray]  # input name -> [N, ...] as the model takes it
    source: str  # "eval.csv", "train.csv" or "synthetic"

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def tensors(self, inputs: Sequence[ModelInput]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(self.arrays[s.name]) for s in inputs)


#: Image bytes -> input name -> one image's array, as a model's runtime preprocesses it.
Prepare = Callable[[bytes], dict[str, np.ndarray]]


def _manifest_items(run: Path, classes: Sequence[str], name: str) -> list[Item]:
    path = run / name
    return read_manifest(path, classes) if path.is_file() else []


def _stacked(images: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.stack([im[name] for im in images]) for name in images[0]}


def _synthetic_photos() -> list[bytes]:
    """Two PNGs of noise over a gradient: check images when no photo of the run can be read."""
    rng = np.random.default_rng(0)
    photos = []
    for _ in range(2):
        pixels = rng.normal(128, 40, (96, 80, 3)) + np.linspace(-60, 60, 80)[None, :, None]
        out = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "PNG")
        photos.append(out.getvalue())
    return photos


def check_batch(run: Path, classes: Sequence[str], prepare: Prepare, n: int) -> CheckBatch:
    """Up to ``n`` real images spread over the run's eval (else train) manifest, ``prepare``-d.

    Falls back to two synthetic images when no listed file can be read any more, so an
    export never depends on the photos still being there.
    """
    for name in (EVAL_CSV, TRAIN_CSV):
        items = _manifest_items(run, classes, name)
        stride = max(1, len(items) // max(1, n))
        images = []
        for item in items[::stride]:
            try:
                images.append(prepare(read_file(item.path)))
            except BadImage:
                continue
            if len(images) == n:
                break
        if images:
            return CheckBatch(_stacked(images), name)
    return CheckBatch(_stacked([prepare(data) for data in _synthetic_photos()]), "synthetic")


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What ``florist export`` did and measured.

    Attributes:
        max_abs_diff: largest |exported - PyTorch| probability on the check images.
        quantize: ``int8`` or ``fp16`` for a quantized file, else None.
        fp32_max_abs_diff: for a quantized file: the same for the fp32 model it was made from
            (the parity check that gates the export).
        evaluation: for a quantized or TFLite file (see :func:`compare_on_eval`): top-1 of the
            file and of the run on the run's eval split, and how often they agree.
    """

    path: Path
    format: str
    size_bytes: int
    check_images: int
    check_source: str
    max_abs_diff: float
    inputs: list[str] = field(default_factory=list)
    quantize: str | None = None
    fp32_max_abs_diff: float | None = None
    evaluation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "path": str(self.path)}

    def summary(self) -> list[str]:
        """What ``florist export`` prints: the file, the parity check and the eval-split comparison."""
        precision = self.quantize or "fp32"
        lines = [
            f"wrote {self.path} ({self.format} {precision}, {self.size_bytes / 1e6:.1f} MB, "
            f"inputs {', '.join(self.inputs)})"
        ]
        where = f"on {self.check_images} images from {self.check_source}"
        if self.fp32_max_abs_diff is not None:
            lines.append(f"parity: max |fp32 export - PyTorch| probability {self.fp32_max_abs_diff:.2e} {where}")
            where = ""
        lines.append(f"parity: max |{precision} export - PyTorch| probability {self.max_abs_diff:.2e} {where}".rstrip())
        e = self.evaluation
        if e is None:
            return lines
        if not e.get("n"):
            return [*lines, f"eval split: not measured ({e.get('note')})"]
        return [
            *lines,
            f"eval split: top-1 {e['top1_export']:.2%} vs the run's {e['top1_run']:.2%} "
            f"({e['top1_change'] * 100:+.2f} points), same top class on {e['agreement']:.1%} of {e['n']} images",
        ]


def _onnx_bytes(graph: ExportGraph, example: tuple[torch.Tensor, ...], metadata: dict[str, Any]) -> bytes:
    """Trace ``graph`` to ONNX (dynamic batch axis) and attach ``metadata``."""
    import onnx

    names = [s.name for s in graph.inputs]
    return _with_metadata(onnx.load_from_string(trace_onnx(graph, example, names, OUTPUT_NAME)), metadata)


def _with_metadata(model: Any, metadata: dict[str, Any]) -> bytes:
    """``model`` (an ``onnx.ModelProto``) with the florist metadata set, checked and serialised."""
    import onnx

    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata, ensure_ascii=False))
    model.doc_string = (
        f"florist image classifier: {len(metadata['classes'])} classes; inputs "
        + ", ".join(d["name"] for d in metadata["inputs"])
        + f" -> {OUTPUT_NAME}; preprocessing and labels in metadata_props['{METADATA_KEY}']"
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _session_probabilities(data: bytes, batch: CheckBatch) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], batch.arrays)[0]


def _quantize(fp32: bytes, metadata: dict[str, Any]) -> bytes:
    """ONNX Runtime dynamic int8 quantization (weights int8, activations quantized on the fly)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # the quantizer logs a warning per shape tensor it leaves alone
    with only_errors_logged(), tempfile.TemporaryDirectory(prefix="florist-quantize-") as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre))
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
        model = onnx.load(str(dst))
    return _with_metadata(model, metadata)


def _top1(model: ArrayClassifier, items: Sequence[Item], progress: ProgressFn | None) -> np.ndarray:
    """Predicted class of each item (-1 for unreadable files) by ``model``."""
    probs, errors = model.predict_proba([it.path for it in items], progress=progress)
    predicted = np.nan_to_num(probs, nan=-1.0).argmax(axis=1)
    predicted[list(errors)] = -1
    return predicted


def compare_on_eval(
    run_model: ArrayClassifier,
    exported: ArrayClassifier,
    run: Path,
    limit: int | None,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    """Top-1 of an exported file and of the run itself on the run's eval split, and their agreement.

    Args:
        limit: use at most this many eval images, spread over the split.
    """
    items = _manifest_items(run, run_model.classes, EVAL_CSV)
    if limit and len(items) > limit:
        items = items[:: len(items) // limit][:limit]
    if not items:
        return {"n": 0, "note": "the run has no eval split"}
    a, b = (_top1(m, items, progress) for m in (run_model, exported))
    truth = np.array([it.label for it in items])
    ok = (a >= 0) & (b >= 0)
    if not ok.any():
        return {"n": 0, "note": "no eval image could be read"}
    top1_run = float(np.mean(a[ok] == truth[ok]))
    top1_export = float(np.mean(b[ok] == truth[ok]))
    return {
        "n": int(ok.sum()),
        "top1_run": top1_run,
        "top1_export": top1_export,
        "top1_change": top1_export - top1_run,
        "agreement": float(np.mean(a[ok] == b[ok])),
    }


def export(
    run_dir: str | Path,
    out: str | Path,
    *,
    format: str = "onnx",
    quantize: str | None = None,
    check_images: int = 16,
    eval_limit: int | None = None,
    progress: ProgressFn | None = None,
) -> ExportReport:
    """Export a run's classifier to one file and check it against PyTorch.

    Args:
        run_dir: a finished run folder (head or tune-top, one or several backbones).
        out: the file to write (atomically; replaced if it exists).
        format: ``onnx``, ``torchscript``, ``openvino`` or ``tflite`` (see :mod:`florist.tflite`).
        quantize: ``int8`` (ONNX: ONNX Runtime's dynamic int8 weights; TFLite: int8 weights
            and activations calibrated on training photos) or ``fp16`` (TFLite: float16 weights).
        check_images: how many real images (from the run's manifests) the parity check uses.
        eval_limit: evaluate a quantized or TFLite file on at most this many eval images.
        progress: ``progress(done, total)`` while the file and the run are evaluated.

    Raises:
        FloristError: not a run folder, unsupported option or preprocessing, or an fp32
            model whose probabilities differ from PyTorch's by more than :data:`PARITY_TOLERANCE`.
    """
    if format not in FORMATS:
        raise SettingError(f"{{format}} must be one of {', '.join(FORMATS)}, got {literal(format)}")
    if quantize is not None and quantize not in QUANTIZE.get(format, ()):
        offered = "; ".join(f"{{format:{f}}}: {' or '.join(q)}" for f, q in QUANTIZE.items())
        raise SettingError(f"{{quantize}} {literal(quantize)} is not offered for {{format:{format}}} ({offered})")
    if check_images < 1:
        raise SettingError(f"{{check_images}} must be >= 1, got {literal(check_images)}")
    run, out = Path(run_dir), Path(out)
    if format == "openvino" and out.suffix != ".xml":
        raise SettingError(f"{{format:openvino}} writes NAME.xml and NAME.bin: name the .xml file, got {out.name!r}")
    classifier = load_run(run)
    graph = ExportGraph(classifier)
    model = ImageGraph(graph) if format == "tflite" else graph
    batch = check_batch(run, classifier.classes, _preparer(model, format), check_images)
    with torch.inference_mode():
        reference = model(*batch.tensors(model.inputs)).numpy()
    metadata = export_metadata(classifier, model.inputs, quantize or "fp32")
    fp32_diff = None
    if format == "onnx":
        data = _onnx_bytes(graph, batch.tensors(graph.inputs), metadata)
        diff = float(np.abs(_session_probabilities(data, batch) - reference).max())
        if quantize:
            _check_parity(diff)
            fp32_diff, data = diff, _quantize(data, metadata)
            diff = float(np.abs(_session_probabilities(data, batch) - reference).max())
    elif format == "tflite":
        calibration = [it.path for it in _manifest_items(run, classifier.classes, TRAIN_CSV)]
        data, diff, fp32_diff = _tflite_bytes(model, batch, reference, metadata, quantize, calibration)
    elif format == "openvino":
        data, weights, diff = _openvino_files(graph, batch, reference, metadata)
    else:
        data, diff = _torchscript_bytes(graph, batch, reference, metadata)
    if fp32_diff is None:
        _check_parity(diff)
    evaluation = None
    if evaluates(format, quantize):
        evaluation = _evaluate(data, format, classifier, run, eval_limit, progress)
    if format == "openvino":
        atomic_write_bytes(out.with_suffix(".bin"), weights)  # the .xml, written last, names a whole model
    atomic_write_bytes(out, data)
    names = [s.name for s in model.inputs]
    return ExportReport(
        out, format, len(data), len(batch), batch.source, diff, names, quantize, fp32_diff, evaluation
    )


def _preparer(model: nn.Module, format: str) -> Prepare:
    """How the exported file's runtime turns image bytes into ``model``'s inputs."""
    if format == "tflite":
        preprocessing = model.inputs[0].data_config
        return lambda data: {tflite.INPUT_NAME: tflite.image_pixels(data, preprocessing)}
    return lambda data: image_arrays(data, model.inputs)


def evaluates(format: str, quantize: str | None) -> bool:
    """Whether :func:`export` compares the file with the run on its eval split: quantized or TFLite files."""
    return bool(quantize) or format == "tflite"


def _evaluate(
    data: bytes, format: str, classifier: Classifier, run: Path, limit: int | None, progress: ProgressFn | None
) -> dict[str, Any]:
    """:func:`compare_on_eval` of the file about to be written (loaded from a temporary copy) and the run.

    The copy is named for its format (``model.onnx``, ``model.tflite``), whatever the user calls
    the output, so that :func:`florist.loader.load` picks its runtime.
    """
    with tempfile.TemporaryDirectory(prefix="florist-evaluate-") as tmp:
        path = Path(tmp, f"model.{format}")
        path.write_bytes(data)
        return compare_on_eval(GraphClassifier(classifier), load(path), run, limit, progress)


def _tflite_bytes(
    model: nn.Module,
    batch: CheckBatch,
    reference: np.ndarray,
    metadata: dict[str, Any],
    quantize: str | None,
    calibration: Sequence[Path],
) -> tuple[bytes, float, float | None]:
    """Convert to TFLite, check the fp32 file's parity, quantize, and attach the metadata.

    Returns the file, its max probability difference from PyTorch on ``batch``, and (when
    quantized) the fp32 file's.
    """
    (example,) = batch.tensors(model.inputs)
    images = batch.arrays[tflite.INPUT_NAME]
    data = tflite.convert(model, example[:1])
    diff = float(np.abs(tflite.TFLiteRunner(data, "the converted model")(images) - reference).max())
    _check_parity(diff)
    fp32_diff = None
    if quantize:
        preprocessing = model.inputs[0].data_config
        fp32_diff = diff
        data = tflite.quantize(
            data, quantize, lambda: tflite.calibration_images(calibration, preprocessing, tflite.CALIBRATION_IMAGES)
        )
        diff = float(np.abs(tflite.TFLiteRunner(data, "the quantized model")(images) - reference).max())
    metadata["inputs"][0].update(dtype="uint8", layout="NHWC")
    return tflite.with_metadata(data, metadata), diff, fp32_diff


def _check_parity(diff: float) -> None:
    if not diff <= PARITY_TOLERANCE:
        raise FloristError(
            f"exported model disagrees with PyTorch (max probability difference {diff:.2e} > "
            f"{PARITY_TOLERANCE:.0e}); nothing was written"
        )


def _torchscript_bytes(
    graph: ExportGraph, batch: CheckBatch, reference: np.ndarray, metadata: dict[str, Any]
) -> tuple[bytes, float]:
    """Trace ``graph`` with TorchScript, save it with the metadata, and measure its difference."""
    example = batch.tensors(graph.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still shipped
        traced = torch.jit.trace(graph, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(
            traced, buffer, _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata, ensure_ascii=False)}
        )
    data = buffer.getvalue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.inference_mode():
        diff = float(np.abs(loaded(*example).numpy() - reference).max())
    return data, diff


def _openvino_files(
    graph: ExportGraph, batch: CheckBatch, reference: np.ndarray, metadata: dict[str, Any]
) -> tuple[bytes, bytes, float]:
    """Convert ``graph`` to OpenVINO IR (fp32 weights, metadata in its rt_info) and measure its difference.

    Returns the ``.xml`` and ``.bin`` contents, read back from a temporary folder.
    """
    ov = import_openvino()

    model = convert_openvino(graph, batch.tensors(graph.inputs))
    for port, spec in zip(model.inputs, graph.inputs):
        port.get_tensor().set_names({spec.name})
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    model.set_rt_info(json.dumps(metadata, ensure_ascii=False), [METADATA_KEY])
    with tempfile.TemporaryDirectory(prefix="florist-openvino-") as tmp:
        xml = Path(tmp, "model.xml")
        ov.save_model(model, str(xml), compress_to_fp16=False)
        diff = float(np.abs(OpenVINOClassifier(xml).probabilities(batch.arrays) - reference).max())
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes(), diff


def read_torchscript_metadata(path: str | Path) -> dict[str, Any]:
    """The florist metadata of an exported TorchScript file."""
    files = {TORCHSCRIPT_METADATA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[TORCHSCRIPT_METADATA])
