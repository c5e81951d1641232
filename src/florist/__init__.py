"""florist: turn a folder of labelled photos into an accurate image classifier.

    >>> import florist
    >>> model = florist.train("flower_photos", "runs/flowers")        # doctest: +SKIP
    >>> florist.load("runs/flowers").predict(["rose.jpg"])[0].labels  # doctest: +SKIP

Stages, one module each, data flowing one way:
photos -> :mod:`~florist.data` (prepare) -> :mod:`~florist.features` (with
:mod:`~florist.backbones`) -> :mod:`~florist.train` -> :mod:`~florist.bundle`
-> :mod:`~florist.predict` / :mod:`~florist.evaluate`; :mod:`~florist.report` shows a
run as HTML and :mod:`~florist.audit` checks a photo folder before training.
"""

from .audit import audit
from .backbones import create_backbone
from .data import prepare
from .errors import FloristError
from .evaluate import evaluate
from .predict import Classifier, Prediction, load
from .report import write_report
from .train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "FloristError",
    "Prediction",
    "TrainConfig",
    "audit",
    "create_backbone",
    "evaluate",
    "load",
    "prepare",
    "train",
    "write_report",
    "__version__",
]
