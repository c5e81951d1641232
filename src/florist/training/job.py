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
from .loop import Board
from .settings import TrainConfig


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
