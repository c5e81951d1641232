"""What every back end returns: :class:`Prediction` objects, ranked the same way.

Kept free of torch: a run folder's model (:class:`florist.predict.Classifier`) and an
exported ``.onnx`` file (:class:`florist.runtime.OnnxClassifier`) both answer with these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Prediction:
    """Top-k classes for one image, best first; ``error`` is set instead when it could not be read.

    ``ood_score`` (higher = less like the training classes) and ``unknown`` (the score is
    above the model's threshold) are None for models without an out-of-distribution detector.
    """

    path: str
    labels: list[str]
    probabilities: list[float]
    error: str | None = None
    ood_score: float | None = None
    unknown: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error:
            return {"path": self.path, "error": self.error}
        out: dict[str, Any] = {
            "path": self.path,
            "label": self.labels[0],
            "probability": self.probabilities[0],
            "top_k": [{"label": c, "probability": p} for c, p in zip(self.labels, self.probabilities)],
        }
        if self.ood_score is not None:
            out["ood_score"] = self.ood_score
            out["unknown"] = self.unknown
        return out


def rank(
    names: Sequence[str],
    probs: np.ndarray,
    errors: dict[int, str],
    classes: Sequence[str],
    top_k: int,
    *,
    ood: np.ndarray | None = None,
    threshold: float | None = None,
) -> list[Prediction]:
    """One :class:`Prediction` per row of ``probs`` (``[N, classes]``); rows in ``errors`` get the error.

    ``ood`` holds each row's out-of-distribution score; a score above ``threshold`` is
    "unknown" (with no threshold, nothing is).
    """
    k = max(1, min(top_k, len(classes)))
    out = []
    for i, name in enumerate(names):
        if i in errors:
            out.append(Prediction(name, [], [], errors[i]))
            continue
        order = np.argsort(-probs[i], kind="stable")[:k]
        p = Prediction(name, [classes[j] for j in order], [float(probs[i, j]) for j in order])
        if ood is not None:
            p.ood_score = float(ood[i])
            p.unknown = threshold is not None and p.ood_score > threshold
        out.append(p)
    return out


#: File suffixes of exported models: ONNX, OpenVINO IR (``.xml`` beside its ``.bin``) and TFLite.
EXPORTED_SUFFIXES = (".onnx", ".xml", ".tflite")


def is_exported(path: str | Path) -> bool:
    """True for a path naming an exported model file (rather than a run folder)."""
    return Path(path).suffix.lower() in EXPORTED_SUFFIXES
