"""Seeded stratified samples: how the steps that cost more than linear time stay bounded on large datasets.

A covariance estimate or a logistic regression fitted on a few thousand photos per
class is as good as one fitted on a hundred thousand for what florist asks of it
(a quantile of distances, out-of-fold class probabilities), while the time grows with
every photo; :func:`stratified_sample` picks those photos, every class in proportion.
"""

from __future__ import annotations

import numpy as np


def stratified_sample(labels: np.ndarray, size: int, seed: int = 0, minimum: int = 1) -> np.ndarray:
    """Sorted indices of about ``size`` rows, each class in proportion and at least ``minimum`` of it; all when fewer.

    Args:
        labels: ``[N]`` class of each row.
        size: rows wanted; a class keeps at least ``minimum`` rows (or all it has), so the
            result can be slightly larger.
        seed: the same seed and labels give the same rows.
    """
    labels = np.asarray(labels)
    if len(labels) <= size:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        take = min(len(rows), max(minimum, round(len(rows) * size / len(labels))))
        picked.append(rng.choice(rows, take, replace=False))
    return np.sort(np.concatenate(picked))


def fold_count(asked: int, photos: int, enough: int) -> int:
    """The fewest folds, from 2 up to ``asked``, whose every k-1 folds hold ``enough`` of ``photos``.

    A cross-fit fits one model per fold on the other folds. Once those hold ``enough``
    photos (for a model that stops gaining from more, or that is fitted on a sample of
    that size anyway), further folds cost a fit each and add nothing; ``asked`` when even
    ``asked`` folds leave fewer.
    """
    for k in range(2, asked):
        if photos * (k - 1) / k >= enough:
            return k
    return asked
