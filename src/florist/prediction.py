"""What every back end returns, and the one :func:`load` that picks the back end.

Kept free of torch: a run folder is loaded with PyTorch (:class:`florist.predict.Classifier`),
an exported ``.onnx`` file with ONNX Runtime (:class:`florist.runtime.OnnxClassifier`),
and both give the same :class:`Prediction` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import FloristError

if TYPE_CHECKING:
    from .predict import Classifier
    from .runtime import OnnxClassifier


@dataclass
class Prediction:
    """Top-k classes for one image, best first; ``error`` is set instead when it could not be read."""

    path: str
    labels: list[str]
    probabilities: list[float]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error:
            return {"path": self.path, "error": self.error}
        return {
            "path": self.path,
            "label": self.labels[0],
            "probability": self.probabilities[0],
            "top_k": [{"label": c, "probability": p} for c, p in zip(self.labels, self.probabilities)],
        }


def rank(
    names: Sequence[str], probs: np.ndarray, errors: dict[int, str], classes: Sequence[str], top_k: int
) -> list[Prediction]:
    """One :class:`Prediction` per row of ``probs`` (``[N, classes]``); rows in ``errors`` get the error."""
    k = max(1, min(top_k, len(classes)))
    out = []
    for i, name in enumerate(names):
        if i in errors:
            out.append(Prediction(name, [], [], errors[i]))
            continue
        order = np.argsort(-probs[i], kind="stable")[:k]
        out.append(Prediction(name, [classes[j] for j in order], [float(probs[i, j]) for j in order]))
    return out


def is_onnx(path: str | Path) -> bool:
    """True for a path naming an exported ONNX model (rather than a run folder)."""
    return Path(path).suffix.lower() == ".onnx"


def load(path: str | Path) -> "Classifier | OnnxClassifier":
    """Load a trained classifier: a run folder (PyTorch) or an exported ``.onnx`` file (ONNX Runtime).

    ``path`` may be a URL (``gs://bucket/runs/x``, ``s3://...``): its model files are fetched
    into the local cache once, and again only when they change.

    Both have ``classes``, ``predict(inputs, top_k)`` and ``predict_proba(paths)``. Loading
    never unpickles: run folders hold safetensors + JSON, ONNX files a protobuf graph.

    Raises:
        FloristError: if ``path`` holds no finished, compatible model.
    """
    from .remote import local_input

    if is_onnx(path):
        from .runtime import OnnxClassifier

        with local_input(path) as model:  # a URL is fetched into the local cache once
            return OnnxClassifier(model.path)
    if Path(path).is_file():
        raise FloristError(f"{path} is a file: expected a run folder or an exported .onnx model")
    from .bundle import MODEL_JSON, MODEL_WEIGHTS, read_bundle
    from .predict import Classifier

    with local_input(path, only=[MODEL_JSON, MODEL_WEIGHTS]) as run:
        return Classifier.from_bundle(read_bundle(run.path))
