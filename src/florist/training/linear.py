"""A linear classifier on feature arrays: what head mode trains, usable on its own for experiments.

Defaults follow the original TensorFlow retraining project: Adam, learning rate
0.005, batch 32. ``optimizer="sgd"`` gives plain SGD with exponential learning
rate decay, ``lr * decay_rate ** (step / decay_steps)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bundle import build_head, linear_head_spec
from ..predict import average_probabilities
from .loop import History, Plan, Watch, run_steps
from .registry import resolve
from .settings import TrainConfig


def class_weight_vector(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights: ``n / (num_classes * count_c)`` (0 for absent classes)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _make_optimizer(head: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rate, every = cfg.decay_rate, cfg.decay_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: rate ** (step / every))
    return opt, schedule


def fit_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    num_classes: int,
    cfg: TrainConfig,
    *,
    eval_x: Sequence[np.ndarray] = (),
    watch: Watch | None = None,
) -> tuple[nn.Module, History]:
    """Train a linear head on feature arrays; deterministic for a given ``cfg.seed``.

    Args:
        train_x, train_y: ``[N, D]`` features and ``[N]`` integer labels.
        num_classes: output size.
        cfg: head-mode settings (``mode`` may be left unset); unset ones take head mode's defaults.
        eval_x: optional held-out features, one array per test-time view (their probabilities
            are averaged), scored against ``watch.eval_labels``; only measured, never used to
            choose anything.
        watch: where each epoch is reported (see :class:`~florist.training.loop.Watch`).

    Raises:
        SettingError: a bad setting, or one head mode does not read.
    """
    cfg = resolve(cfg, mode="head")
    torch.manual_seed(cfg.seed)
    x = torch.as_tensor(train_x, dtype=torch.float32)
    y = torch.as_tensor(train_y, dtype=torch.long)
    head = build_head(linear_head_spec(x.shape[1], num_classes, cfg.dropout))
    weight = class_weight_vector(train_y, num_classes) if cfg.class_weights == "balanced" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    opt, schedule = _make_optimizer(head, cfg)
    total = cfg.steps or min(math.ceil(len(y) / cfg.batch_size) * cfg.epochs, cfg.max_steps or math.inf)

    def evaluate() -> np.ndarray:
        head.eval()
        return average_probabilities(head, eval_x)

    plan = Plan(total, cfg.batch_size, cfg.seed)
    history = run_steps(
        lambda batch: head(x[batch]), y, plan,
        loss_fn=loss_fn, optimizer=opt, schedule=schedule, train_mode=head.train, evaluate=evaluate, watch=watch,
    )  # fmt: skip
    head.eval()
    return head, history
