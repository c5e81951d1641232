"""Stage 5, *evaluate*: predictions -> top-1/top-5, per-class metrics, confusion matrix.

:func:`compute_metrics` is plain numpy/scikit-learn on arrays, used both at the
end of training and by :func:`evaluate` on any folder of labelled photos.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from . import remote
from .data import scan
from .errors import FloristError
from .progress import ProgressFn


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the ``k`` highest probabilities."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y_true[:, None], axis=1))) if len(y_true) else float("nan")


def compute_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics as plain JSON-ready data.

    Returns:
        ``{"n", "top1", "top5", "per_class": {name: {precision, recall, f1, support}},
        "macro_f1", "confusion_matrix": [[...]] (rows = true, columns = predicted), "classes"}``
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0:
        raise FloristError("no images to evaluate")
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "n": int(len(y_true)),
        "top1": top_k_accuracy(y_true, probs, 1),
        "top5": top_k_accuracy(y_true, probs, 5),
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
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def evaluate(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    *,
    batch_size: int = 64,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run on a folder of class folders (default: the run's own eval split).

    Every valid image whose class folder is one of the model's classes is used;
    a class folder the model does not know is an error that names it. Both folders
    may be URLs (see :mod:`florist.remote`); the run's eval split may name remote
    images (a run trained on remote data), which are then fetched.

    Returns:
        :func:`compute_metrics`'s dict plus ``"skipped"`` (path, reason) pairs.
    """
    from .bundle import MODEL_JSON, MODEL_WEIGHTS
    from .data import read_manifest
    from .predict import load

    with remote.local_input(run_dir, only=[MODEL_JSON, MODEL_WEIGHTS, "eval.csv"]) as run:
        model = load(run.path)
        if data_dir is None:
            items = read_manifest(run.path / "eval.csv", model.classes)
            paths = remote.localize([it.path for it in items])
            skipped: list[tuple[str, str]] = []
    if data_dir is not None:
        with remote.local_input(data_dir) as data:
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
