"""florist: turn a folder of labelled photos into an accurate image classifier.

    >>> import florist
    >>> model = florist.train("flower_photos", "runs/flowers")        # doctest: +SKIP
    >>> florist.load("runs/flowers").predict(["rose.jpg"])[0].labels  # doctest: +SKIP

Stages, one module each, data flowing one way:
photos -> :mod:`~florist.data` (prepare) -> :mod:`~florist.features` (with
:mod:`~florist.backbones`) -> :mod:`~florist.training` -> :mod:`~florist.bundle`
-> :mod:`~florist.predict` / :mod:`~florist.evaluate` -> :mod:`~florist.export`
-> :mod:`~florist.serve`; :mod:`~florist.report` shows a run as HTML and
:mod:`~florist.audit` checks a photo folder before training.

An exported ``.onnx`` model needs no torch: :func:`load` on it, ``florist predict``
and ``florist serve`` run it with ONNX Runtime, and this package imports without
torch installed (the training API is then missing).
"""

from .audit import audit
from .data import prepare
from .errors import FloristError
from .evaluate import evaluate
from .loader import load
from .prediction import Prediction
from .training import TrainConfig
from .version import __version__

try:
    from .backbones import create_backbone
    from .predict import Classifier
    from .report import write_report
    from .training.pipeline import train
except ModuleNotFoundError as e:  # a torch-less install serves exported ONNX models only
    if e.name not in ("torch", "torchvision", "timm"):
        raise


__all__ = [
    "Classifier",
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
