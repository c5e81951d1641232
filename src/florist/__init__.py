"""florist: turn a folder of labelled photos into an accurate image classifier.

    >>> import florist
    >>> model = florist.train("flower_photos", "runs/flowers")        # doctest: +SKIP
    >>> florist.load("runs/flowers").predict(["rose.jpg"])[0].labels  # doctest: +SKIP

Stages, one module each, data flowing one way:
photos -> :mod:`~florist.data` (prepare) -> :mod:`~florist.features` (with
:mod:`~florist.backbones`) -> :mod:`~florist.training` -> :mod:`~florist.bundle`
-> :mod:`~florist.predict` / :mod:`~florist.evaluate` -> :mod:`~florist.export`
-> :mod:`~florist.serve`; :mod:`~florist.report` shows a run as HTML and
:mod:`~florist.audit` checks a photo folder before training; :mod:`~florist.explain`
draws where the network looked (Grad-CAM heatmaps).

An exported ``.onnx`` model needs no torch: :func:`load` on it, ``florist predict``
and ``florist serve`` run it with ONNX Runtime, and this package imports without
torch installed (the training API is then missing) and without importing torch where it is.
"""

import importlib
from typing import Any

from .audit import audit
from .data import prepare
from .errors import FloristError
from .evaluate import evaluate
from .loader import load
from .prediction import Prediction
from .training import TrainConfig
from .version import __version__

#: What needs torch, imported on first use: ``import florist`` (and every ``florist`` command)
#: then costs no torch start-up (3 s on a 2-core CPU) until a network is needed. Without
#: torch installed, only exported ONNX models can be used and these names raise ImportError.
_NEEDS_TORCH = {
    "Classifier": "predict",
    "Explainer": "explain",
    "create_backbone": "backbones",
    "train": "training.pipeline",
    "write_report": "report",
}


def __getattr__(name: str) -> Any:
    if name in _NEEDS_TORCH:
        return getattr(importlib.import_module(f".{_NEEDS_TORCH[name]}", __name__), name)
    raise AttributeError(f"module 'florist' has no attribute {name!r}")


__all__ = [
    "Classifier",
    "Explainer",
    "FloristError",
    "Prediction",
    "TrainConfig",
    "__version__",
    "audit",
    "create_backbone",
    "evaluate",
    "load",
    "prepare",
    "train",
    "write_report",
]
