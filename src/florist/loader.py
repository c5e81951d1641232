"""The one way to load a trained model: a run folder, or an exported ``.onnx``, OpenVINO ``.xml`` or ``.tflite`` file.

Importing this module needs no torch: an ``.onnx`` file is run by ONNX Runtime, an
``.xml`` file by OpenVINO, a ``.tflite`` file by LiteRT, and torch is imported only for a run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FloristError
from .prediction import is_exported
from .remote import local_input
from .runfiles import MODEL_JSON, MODEL_WEIGHTS

if TYPE_CHECKING:
    from .predict import Classifier
    from .runtime import ExportedClassifier


def load(path: str | Path, *, engine: str | None = None) -> "Classifier | ExportedClassifier":
    """Load a trained classifier: a run folder, or an exported ``.onnx`` (ONNX Runtime), ``.xml`` (OpenVINO) or ``.tflite`` (LiteRT) file.

    ``path`` may be a URL (``gs://bucket/runs/x``, ``s3://...``): its model files are fetched
    into the local cache once, and again only when they change.

    Both have ``classes``, ``predict(inputs, top_k)`` and ``predict_proba(paths)``. Loading
    never unpickles: run folders hold safetensors + JSON, ONNX files a protobuf graph.
    ``engine`` (run folders only; see :mod:`florist.engines`) overrides the one the run
    computed its features with.

    Raises:
        FloristError: if ``path`` holds no finished, compatible model.
    """
    if is_exported(path):
        from .runtime import OnnxClassifier, OpenVINOClassifier

        suffix = Path(path).suffix.lower()
        if suffix == ".xml":
            with local_input(path, siblings=[Path(path).with_suffix(".bin").name]) as model:
                return OpenVINOClassifier(model.path)
        if suffix == ".tflite":
            from .tflite import TFLiteClassifier

            with local_input(path) as model:
                return TFLiteClassifier(model.path)
        with local_input(path) as model:  # a URL is fetched into the local cache once
            return OnnxClassifier(model.path)
    return load_run(path, engine=engine)


def load_run(path: str | Path, *, engine: str | None = None) -> "Classifier":
    """The PyTorch classifier of a run folder (what export and the server's PyTorch back end start from).

    Raises:
        FloristError: ``path`` is a file (an exported model, say) or holds no finished, compatible run.
    """
    if is_exported(path):
        raise FloristError(f"{path} is already an exported model; expected a run folder")
    if Path(path).is_file():
        raise FloristError(f"{path} is a file: expected a run folder or an exported .onnx model")
    from .bundle import read_bundle
    from .predict import Classifier

    with local_input(path, only=[MODEL_JSON, MODEL_WEIGHTS]) as run:
        return Classifier.from_bundle(read_bundle(run.path), _engine(engine))


def _engine(name: str | None) -> str | None:
    """``--engine`` for a stored model: None (and ``auto``) keep the model's own, where it runs here."""
    if name is None or name == "auto":
        return None
    import torch

    from .engines import resolve_engine

    return resolve_engine(name, torch.device("cpu"))  # a loaded classifier computes on the CPU
