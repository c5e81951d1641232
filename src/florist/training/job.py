"""What a mode's ``fit`` works on (:class:`Job`) and what it hands back (:class:`Fitted`).

Shared by the pipeline, the modes, the cross-fit and the ensemble; kept apart from
:mod:`florist.training.pipeline` so that those can use them without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbones import Backbone
from ..data import Item, Prepared
from ..features import feature_key
from .loop import Board
from .settings import TrainConfig


@dataclass
class Remembered:
    """Pooled features this run has read already, by cache key and image hash.

    The cross-fit's folds train on subsets of the photos the final fit read: serving
    them from memory saves reading every row from the store again, per fold (at
    100,000 photos, about 6 s a fold on this 2-core CPU). Only pooled features are
    kept: tune-top's activations are too large to hold twice.
    """

    rows: dict[tuple[str, ...], dict[str, np.ndarray]] = field(default_factory=dict)

    @staticmethod
    def key(backbones: list[Backbone], view: str, seed: int) -> tuple[str, ...]:
        """What a view's pooled features (the backbones' side by side) are remembered by: their cache keys."""
        return tuple(feature_key(b, view, seed, "pooled") for b in backbones)

    def get(self, key: tuple[str, ...], items: list[Item]) -> np.ndarray | None:
        """The rows of ``items`` in order, or None unless every one is remembered."""
        known = self.rows.get(key)
        if not items or known is None or any(it.sha256 not in known for it in items):
            return None
        return np.stack([known[it.sha256] for it in items])

    def add(self, key: tuple[str, ...], items: list[Item], rows: np.ndarray) -> None:
        self.rows.setdefault(key, {}).update(zip((it.sha256 for it in items), rows))


@dataclass
class Job:
    """What a mode's ``fit`` works on: the networks, the split, the resolved settings, the run's places."""

    backbones: list[Backbone]
    prepared: Prepared
    cfg: TrainConfig
    out: Path
    cache_root: Path
    device: torch.device
    board: Board | None  # TensorBoard log, or None in processes other than rank 0
    verbose: bool
    resume: bool
    timings: dict[str, float]
    initial_state: list[dict[str, torch.Tensor]] = field(default_factory=list)  # backbones before the fit
    curves: bool = True  # score the eval split after every epoch (the cross-fit's folds skip it: nobody reads them)
    remembered: Remembered = field(default_factory=Remembered)  # shared with the cross-fit's sub-jobs

    def curve_views(self, views: list[Any]) -> list[Any]:
        """``views`` of the eval split for the per-epoch curves, or none when :attr:`curves` is off."""
        return views if self.curves else []


@dataclass
class Fitted:
    """What a mode's ``fit`` hands back to the pipeline."""

    head: nn.Module
    history: dict[str, list[float]]
    train: list[Item]  # images actually used (failed ones removed)
    eval: list[Item]
    eval_probs: np.ndarray  # TTA-averaged probabilities on ``eval``
    computed: int  # images that went through the network (cache misses)
    views: list[str]  # the cached training views, for metrics.json
    backbone_states: list[dict[str, torch.Tensor]] = field(default_factory=list)  # tuned tensors per backbone
    extra_metrics: dict[str, Any] = field(default_factory=dict)  # mode-specific entries of metrics.json
