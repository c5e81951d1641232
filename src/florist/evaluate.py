"""Stage 5, *evaluate*: predictions -> top-1/top-5, per-class metrics, confusion matrix.

:func:`compute_metrics` is plain numpy on arrays, used both at the end of training
and by :func:`evaluate` on any folder of labelled photos. (scikit-learn computes the
same figures, tested equal, but importing it costs a second of every run.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import remote
from .calibration import expected_calibration_error
from .data import scan
from .errors import FloristError
from .progress import ProgressFn
from .runfiles import EVAL_CSV, MODEL_JSON, MODEL_WEIGHTS
from .tfrecord import is_record_data, scan_record_data


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the ``k`` highest probabilities."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y_true[:, None], axis=1))) if len(y_true) else float("nan")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` counts: row = true class, column = predicted class."""
    pairs = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, 0 where ``den`` is 0 (a class never predicted or never present)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def compute_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics as plain JSON-ready data.

    Returns:
        ``{"n", "top1", "top5", "ece" (expected calibration error, 15 bins), "per_class": {name: {precision, recall, f1, support}},
        "macro_f1", "confusion_matrix": [[...]] (rows = true, columns = predicted), "classes"}``
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0:
        raise FloristError("no images to evaluate")
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, len(classes))
    hits, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    precision = _ratio(hits, predicted)
    recall = _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "n": int(len(y_true)),
        "top1": top_k_accuracy(y_true, probs, 1),
        "top5": top_k_accuracy(y_true, probs, 5),
        "ece": expected_calibration_error(probs, y_true),
        "macro_f1": float(np.mean(f1)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "classes": list(classes),
        "confusion_matrix": cm.tolist(),
    }


def evaluate(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    *,
    batch_size: int = 64,
    engine: str | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run on a folder of class folders or TFRecord data (default: the run's own eval split).

    ``engine`` overrides the one the run computes its features with (see :mod:`florist.engines`).

    Every valid image whose class folder is one of the model's classes is used;
    a class folder the model does not know is an error that names it. TFRecord
    data gives its ``eval*`` files, or every record (see
    :func:`florist.tfrecord.scan_record_data`). Both folders
    may be URLs (see :mod:`florist.remote`); the run's eval split may name remote
    images (a run trained on remote data), which are then read where they are.

    Returns:
        :func:`compute_metrics`'s dict plus ``"skipped"`` (path, reason) pairs.
    """
    from .data import read_manifest
    from .inputs import data_input, localize
    from .loader import load

    with remote.local_input(run_dir, only=[MODEL_JSON, MODEL_WEIGHTS, EVAL_CSV]) as run:
        model = load(run.path, engine=engine)
        if data_dir is None:
            items = read_manifest(run.path / EVAL_CSV, model.classes)
            paths = localize([it.path for it in items])
            skipped: list[tuple[str, str]] = []
    if data_dir is not None:
        with data_input(data_dir) as data:
            if is_record_data(data.path):
                ds = scan_record_data(data.path, model.classes)
            else:
                ds = scan(data.path, classes=model.classes)
        paths = [it.path for it in ds.items]
        items = [replace(it, path=data.to_url(it.path)) for it in ds.items]  # named as given
        skipped = [(data.to_url(s.path), s.reason) for s in ds.skipped]
    if not items:
        raise FloristError(f"no valid images of the model's classes in {data_dir or run_dir}")
    probs, errors = model.predict_proba(paths, shas=[it.sha256 for it in items], cache=True, progress=progress)
    skipped += [(items[i].path, reason) for i, reason in errors.items()]
    ok = [i for i in range(len(items)) if i not in errors]
    metrics = compute_metrics([items[i].label for i in ok], probs[ok], model.classes)
    metrics["skipped"] = skipped
    return metrics
