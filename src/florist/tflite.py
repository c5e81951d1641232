"""TFLite (LiteRT) export and runtime: one ``.tflite`` file for phones, edge boards and MediaPipe.

The file has one input, ``image``: ``[1, H, W, 3]`` uint8, the photo resized and centre-cropped
as the run's backbones see it (:func:`florist.preprocess.crop_pixels`). Normalisation, the
mirrored test-time view, every backbone, the head and the average over the views are inside
the graph; the output is ``[1, classes]`` probabilities (an int8 file quantizes them, with the
scale and zero point on the tensor). That is the layout MediaPipe's ImageClassifier takes, and
the file carries MediaPipe's model metadata: an RGB image input, and a score output whose
``labels.txt`` lists the classes. florist's own metadata (:func:`florist.export.export_metadata`)
rides along as ``florist.json``. Both are associated files, zipped after the flatbuffer where
MediaPipe looks for them, so reading them back needs only :mod:`zipfile`.

The pieces are maintained Google tools, installed with ``pip install 'florist[tflite]'``:
litert-torch converts the PyTorch graph (no TensorFlow needed; ONNX -> onnx2tf would pull
TensorFlow in), ai-edge-quantizer makes the fp16 (weights cast to float16) and int8 (weights and
activations, calibrated on training photos) files, ai-edge-litert's interpreter runs them, and
MediaPipe's generated metadata schema describes them.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .data import BadImage
from .errors import FloristError, SettingError
from .preprocess import ModelInput, crop_pixels, load_for_backbone
from .progress import only_errors_logged
from .runtime import ExportedClassifier
from .version import __version__

#: The one input of an exported TFLite model.
INPUT_NAME = "image"
#: Quantizations ``florist export --format tflite --quantize`` offers.
QUANTIZATIONS = ("fp16", "int8")
#: Associated files zipped after the flatbuffer.
LABELS_FILE = "labels.txt"
METADATA_FILE = "florist.json"
#: Training photos the int8 activation ranges are measured on.
CALIBRATION_IMAGES = 64
#: Name of MediaPipe's metadata buffer in the flatbuffer, and the file identifiers it checks.
_MEDIAPIPE_METADATA = "TFLITE_METADATA"
_METADATA_IDENTIFIER = b"M001"
_MODEL_IDENTIFIER = b"TFL3"
#: Preprocessing keys that the graph applies itself (the rest must be shared by every backbone).
_IN_GRAPH = ("mean", "std")


def require(module: str) -> Any:
    """Import one of the ``tflite`` extra's packages, or say in one line how to install them."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FloristError(
            f"TFLite models need {module.split('.')[0]}: pip install 'florist[tflite]'"
        ) from None


def image_preprocessing(inputs: Sequence[ModelInput]) -> dict[str, Any]:
    """The resize and crop every input shares: one uint8 image must serve all backbones.

    Raises:
        SettingError: backbones that take different image sizes or crops (lite0 224 px and
            lite2 260 px, say); export those to ONNX or OpenVINO, which take one input each.
    """
    shared = [{k: v for k, v in s.data_config.items() if k not in _IN_GRAPH} for s in inputs]
    if any(c != shared[0] for c in shared[1:]):
        sizes = sorted({tuple(c["input_size"]) for c in shared})
        raise SettingError(
            "{format:tflite} takes one image, and this run's backbones resize and crop differently "
            f"(input sizes {', '.join('x'.join(map(str, s[1:])) for s in sizes)}): export it to ONNX or OpenVINO"
        )
    return shared[0]


def image_input(inputs: Sequence[ModelInput]) -> ModelInput:
    """The TFLite model's one input, described as an exported model's inputs are."""
    return ModelInput(INPUT_NAME, 0, "clean", image_preprocessing(inputs))


def image_pixels(data: bytes, preprocessing: dict[str, Any], max_pixels: int | None = None) -> np.ndarray:
    """Image bytes -> the ``[H, W, 3]`` uint8 input of a TFLite model.

    Raises:
        florist.data.BadImage: not a usable image.
    """
    return crop_pixels(load_for_backbone(data, preprocessing, max_pixels), preprocessing)


# ---------------------------------------------------------------------------
# Conversion and quantization
# ---------------------------------------------------------------------------


@contextmanager
def native_output_held() -> Iterator[None]:
    """Hold back what the LiteRT tools print on stderr, shown only if they fail.

    Their native code writes INFO lines to file descriptor 2 directly (absl, oneDNN,
    XNNPACK), past Python's logging; a redirect of the descriptor is the one way to
    keep ``florist export`` and ``predict`` output to what florist reports.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def convert(module: Any, example: Any) -> bytes:
    """The fp32 TFLite flatbuffer of ``module`` (traced with ``example``), by litert-torch."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # its per-pass progress lines
    with native_output_held(), only_errors_logged():  # importing it prints too
        litert_torch = require("litert_torch")
        return bytes(litert_torch.convert(module, (example,)).model_content())


def quantize(model: bytes, how: str, calibration: Callable[[], list[np.ndarray]]) -> bytes:
    """``model`` with fp16 weights, or int8 weights and activations calibrated on ``calibration()`` images.

    Args:
        calibration: called for int8 only: uint8 ``[1, H, W, 3]`` images (training photos).
    """
    # Its progress bars and log lines, and its warning that calibration keeps every tensor to measure it.
    with native_output_held(), only_errors_logged(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Warning: Enabling `experimental_preserve_all_tensors`")
        quantizer = require("ai_edge_quantizer.quantizer")
        q = quantizer.Quantizer(model, _recipe(how))
        ranges = None
        if how == "int8":
            ((signature, names),) = make_interpreter(model, "the converted model").get_signature_list().items()
            (name,) = names["inputs"]
            images = [{name: image} for image in calibration()]
            ranges = q.calibrate({signature: images}, num_threads=os.cpu_count() or 1)
        quantized = bytes(q.quantize(ranges, enable_progress_report=False).quantized_model)
    return float_output(quantized) if how == "int8" else quantized


def _recipe(how: str) -> Any:
    """ai-edge-quantizer's recipe: every supported op's weights cast to fp16, or static int8."""
    from ai_edge_quantizer import recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    manager = recipe_manager.RecipeManager()
    if how == "fp16":
        manager.add_weight_only_config(
            regex=".*",
            operation_name=TFLOperationName.ALL_SUPPORTED,
            num_bits=16,
            algorithm_key=AlgorithmName.FLOAT_CASTING,
        )
        return manager.get_quantization_recipe()
    manager.add_static_config(
        regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8
    )
    # The softmax and the average over views stay float: probabilities near 0 and 1 keep their
    # resolution, and the graph ends in float for float_output to hand over as it is.
    for op in (TFLOperationName.SOFTMAX, TFLOperationName.RESHAPE, TFLOperationName.MEAN):
        manager.add_quantization_config(regex=".*", operation_name=op, algorithm_key=AlgorithmName.NO_QUANTIZE)
    return manager.get_quantization_recipe()


# ---------------------------------------------------------------------------
# Metadata: MediaPipe's, and florist's
# ---------------------------------------------------------------------------


def model_tree(model: bytes) -> Any:
    """A flatbuffer as LiteRT's object tree (``schema.ModelT``), every weight inside it.

    ai-edge-quantizer keeps the weights of files over 256 KB after the flatbuffer, at file
    offsets; repacking the tree moves everything, so those weights are taken in first.
    """
    schema = require("ai_edge_litert.schema_py_generated")
    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model, 0))
    for stored in tree.buffers:
        if stored.offset > 1:
            stored.data = np.frombuffer(model, dtype=np.uint8, count=stored.size, offset=stored.offset)
            stored.offset = stored.size = 0
    return tree


def packed(tree: Any) -> bytes:
    """The flatbuffer of a :func:`model_tree`."""
    import flatbuffers

    builder = flatbuffers.Builder(0)
    builder.Finish(tree.Pack(builder), _MODEL_IDENTIFIER)
    return bytes(builder.Output())


def float_output(model: bytes) -> bytes:
    """``model`` without the QUANTIZE op that turns its float probabilities into int8 at the very end.

    ai-edge-quantizer quantizes a graph's outputs; MediaPipe's ImageClassifier takes only
    float32 or uint8 scores, and float probabilities are what florist reports anyway.
    """
    schema = require("ai_edge_litert.schema_py_generated")
    tree = model_tree(model)
    graph = tree.subgraphs[0]
    (output,) = graph.outputs
    last = next((i for i, op in enumerate(graph.operators) if list(op.outputs) == [output]), None)
    if last is None:
        return model
    code = tree.operatorCodes[graph.operators[last].opcodeIndex]
    if max(code.builtinCode, code.deprecatedBuiltinCode) != schema.BuiltinOperator.QUANTIZE:
        return model
    (source,) = graph.operators[last].inputs
    if graph.tensors[source].type != schema.TensorType.FLOAT32:
        return model
    del graph.operators[last]
    graph.outputs = [source]
    for signature in tree.signatureDefs or []:
        for entry in signature.outputs:
            if entry.tensorIndex == output:
                entry.tensorIndex = source
    return packed(tree)


def with_metadata(model: bytes, metadata: dict[str, Any]) -> bytes:
    """``model`` with MediaPipe's image-classifier metadata and the labels and florist files zipped after it."""
    import flatbuffers

    schema = require("ai_edge_litert.schema_py_generated")
    md = require("mediapipe.tasks.metadata.metadata_schema_py_generated")

    def associated(name: str, kind: int, description: str) -> Any:
        f = md.AssociatedFileT()
        f.name, f.type, f.description = name, kind, description
        return f

    def tensor(name: str, description: str, properties: Any, kind: int) -> Any:
        t = md.TensorMetadataT()
        t.name, t.description = name, description
        t.content = md.ContentT()
        t.content.contentProperties, t.content.contentPropertiesType = properties, kind
        return t

    image = md.ImagePropertiesT()
    image.colorSpace = md.ColorSpaceType.RGB
    size = "x".join(map(str, metadata["inputs"][0]["preprocessing"]["input_size"][1:]))
    subgraph = md.SubGraphMetadataT()
    subgraph.inputTensorMetadata = [
        tensor(INPUT_NAME, f"RGB uint8 photo, resized and centre-cropped to {size}", image,
               md.ContentProperties.ImageProperties)
    ]
    scores = tensor("probability", "class probabilities", md.FeaturePropertiesT(), md.ContentProperties.FeatureProperties)
    scores.associatedFiles = [associated(LABELS_FILE, md.AssociatedFileType.TENSOR_AXIS_LABELS, "class names")]
    subgraph.outputTensorMetadata = [scores]
    model_md = md.ModelMetadataT()
    model_md.name = "florist image classifier"
    model_md.description = f"{len(metadata['classes'])} classes: " + ", ".join(metadata["classes"])[:500]
    model_md.version = __version__
    model_md.minParserVersion = "1.0.0"
    model_md.subgraphMetadata = [subgraph]
    model_md.associatedFiles = [
        associated(METADATA_FILE, md.AssociatedFileType.DESCRIPTIONS, "florist metadata (classes, preprocessing)")
    ]
    builder = flatbuffers.Builder(0)
    builder.Finish(model_md.Pack(builder), _METADATA_IDENTIFIER)

    tree = model_tree(model)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(bytes(builder.Output()), dtype=np.uint8)
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = _MEDIAPIPE_METADATA, len(tree.buffers) - 1
    tree.metadata = [m for m in tree.metadata or [] if m.name.decode() != _MEDIAPIPE_METADATA] + [entry]
    out = io.BytesIO(packed(tree))
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a") as files:
        files.writestr(LABELS_FILE, "\n".join(metadata["classes"]) + "\n")
        files.writestr(METADATA_FILE, json.dumps(metadata, ensure_ascii=False))
    return out.getvalue()


def read_tflite_metadata(data: bytes, source: str) -> dict[str, Any]:
    """The florist metadata zipped after a ``.tflite`` flatbuffer.

    Raises:
        FloristError: no florist metadata there.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as files:
            return json.loads(files.read(METADATA_FILE))
    except (zipfile.BadZipFile, KeyError, ValueError):
        raise FloristError(f"{source} has no florist metadata: export it with `florist export`") from None


# ---------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------


class TFLiteRunner:
    """A TFLite flatbuffer on ai-edge-litert's interpreter: uint8 images in, float32 probabilities out.

    One image per call of the interpreter: the file's batch axis is 1, as MediaPipe expects.
    A lock serialises callers, since an interpreter's tensors are not thread-safe.
    """

    def __init__(self, data: bytes, source: str, threads: int | None = None):
        self.interpreter = make_interpreter(data, source, threads)
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``[N, H, W, 3]`` uint8 -> ``[N, classes]`` float32 (an int8 file's output dequantized)."""
        with self._lock:
            return np.concatenate([self._invoke(image[None]) for image in images])

    def _invoke(self, image: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self._input["index"], np.ascontiguousarray(image, dtype=self._input["dtype"]))
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self._output["index"])
        scale, zero = self._output["quantization"]
        if scale:
            return (out.astype(np.float32) - zero) * np.float32(scale)
        return out.astype(np.float32)


class TFLiteClassifier(ExportedClassifier):
    """An exported ``.tflite`` model run by ai-edge-litert's interpreter on the CPU; needs no torch.

    Args:
        path: a file written by ``florist export --format tflite``.
        threads: interpreter threads (default: one per core).

    Raises:
        FloristError: missing file, not a TFLite model, not exported by florist, or the
            ``tflite`` extra not installed.
    """

    backend = "tflite"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FloristError(f"model file not found: {self.path}")
        data = self.path.read_bytes()
        if data[4:8] != _MODEL_IDENTIFIER:
            raise FloristError(f"cannot load {self.path} as a TFLite model: no TFL3 flatbuffer header")
        self.take_metadata(read_tflite_metadata(data, str(self.path)), str(self.path))
        self.preprocessing = self.inputs[0].data_config
        self.run = TFLiteRunner(data, str(self.path), threads)

    def arrays(self, data: bytes) -> dict[str, np.ndarray]:
        return {INPUT_NAME: image_pixels(data, self.preprocessing, self.max_pixels)}

    def probabilities(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.run(batch[INPUT_NAME])


def make_interpreter(data: bytes, source: str, threads: int | None = None) -> Any:
    """A LiteRT interpreter for a flatbuffer, tensors allocated.

    Raises:
        FloristError: the bytes are not a model the interpreter can run.
    """
    interpreter_module = require("ai_edge_litert.interpreter")
    try:
        with native_output_held():  # "Created TensorFlow Lite XNNPACK delegate for CPU."
            interpreter = interpreter_module.Interpreter(model_content=data, num_threads=threads or os.cpu_count())
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise FloristError(f"cannot load {source} as a TFLite model: {str(e).splitlines()[0][:200]}") from None
    return interpreter


def calibration_images(paths: Sequence[Path], preprocessing: dict[str, Any], n: int) -> list[np.ndarray]:
    """Up to ``n`` readable photos spread over ``paths``, as ``[1, H, W, 3]`` uint8 model inputs."""
    from .data import read_file

    images = []
    for path in paths[:: max(1, len(paths) // n)]:
        try:
            images.append(image_pixels(read_file(path), preprocessing)[None])
        except BadImage:
            continue
        if len(images) == n:
            break
    return images
