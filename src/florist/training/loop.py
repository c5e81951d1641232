"""The one optimisation loop shared by every training mode.

Head training and top-block tuning differ only in what a batch goes through
(a linear layer on features, or backbone blocks plus a head on activations) and
in their optimiser; shuffling, stepping, the learning-rate schedule, the
per-epoch curves and TensorBoard logging are the same and live here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..progress import ProgressFn


@dataclass
class History:
    """Per-epoch training curves, also written to TensorBoard."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train_top1: list[float] = field(default_factory=list)
    eval_top1: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    def add(self, step: int, loss: float, train_top1: float, eval_top1: float, lr: float) -> None:
        """Append one point."""
        for name, value in zip(
            ("step", "loss", "train_top1", "eval_top1", "lr"), (step, loss, train_top1, eval_top1, lr)
        ):
            getattr(self, name).append(value)


@dataclass(frozen=True)
class Plan:
    """Which steps a run takes: how many, in batches of what size, in which seeded order."""

    total_steps: int  # the last epoch may be partial
    batch_size: int
    seed: int  # seeds the shuffling (same seed -> same order)


class Board(Protocol):
    """Where a run's live curves go (TensorBoard in practice: :class:`florist.report.Board`)."""

    def epoch(self, step: int, loss: float, train_top1: float, eval_top1: float, lr: float) -> None:
        """Log one epoch's point of the curves."""

    def confusion(self, step: int, y_true: np.ndarray, y_pred: np.ndarray) -> None:
        """Log the held-out confusion matrix measured at ``step``."""


@dataclass
class Watch:
    """What a run reports after each epoch, besides its curves.

    Attributes:
        eval_labels: classes of the held-out images the ``evaluate`` function scores.
        board: gets the curves after every epoch and the confusion matrix after every eval.
        progress: ``progress(done, total, **stats)`` after every step.
    """

    eval_labels: np.ndarray | None = None
    board: Board | None = None
    progress: ProgressFn | None = None


def top1(probs: np.ndarray | None, labels: np.ndarray | None) -> float:
    """Share of rows of ``probs`` whose argmax is the label (NaN when there is nothing to score)."""
    if probs is None or labels is None or not len(labels) or not len(probs):
        return float("nan")
    return float(np.mean(probs.argmax(1) == labels))


def warmup_cosine(total_steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over a ``warmup`` fraction, then cosine decay to 0.

    Warm-up keeps the first, large gradients of a new head from wrecking pretrained layers.
    """
    warm = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

    return factor


def _local_part(batch: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    """This process's share of a global batch (every process gets at least one example)."""
    rank, world = shard
    local = batch[rank::world]
    return local if len(local) else batch[:1]


def run_steps(
    forward: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    plan: Plan,
    *,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    train_mode: Callable[[], None],
    evaluate: Callable[[], np.ndarray] | None = None,
    watch: Watch | None = None,
    history: History | None = None,
    on_epoch: Callable[[History], bool] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> History:
    """Run ``plan``'s shuffled mini-batch steps, recording one history point per epoch.

    Args:
        forward: batch of example indices -> logits.
        labels: ``[N]`` class of each example.
        train_mode: puts the trained modules in training mode before each epoch.
        evaluate: returns held-out (TTA-averaged) probabilities ``[M, classes]`` after
            each epoch, scored against ``watch.eval_labels``.
        watch: where the epoch's results are reported (nowhere by default).
        history: curves of a run being resumed; its last ``step`` is where training
            continues, with the shuffling order an uninterrupted run would have had.
        on_epoch: called with the curves after each epoch; returning True stops training.
        shard: ``(rank, world_size)``: each process of a multi-process run takes every
            ``world_size``-th example of the same global batch, so together they take
            the steps one process would.
    """
    total_steps, batch_size = plan.total_steps, plan.batch_size
    watch = watch or Watch()
    progress, board, eval_labels = watch.progress, watch.board, watch.eval_labels
    generator = torch.Generator().manual_seed(plan.seed)
    history = history or History()
    for _ in history.step:  # replay the shuffles of finished epochs
        torch.randperm(len(labels), generator=generator)
    step = history.step[-1] if history.step else 0
    while step < total_steps:
        train_mode()
        losses, correct, seen = [], 0, 0
        batches = torch.randperm(len(labels), generator=generator).split(batch_size)
        for i, global_batch in enumerate(batches):
            if step >= total_steps:
                break
            batch = _local_part(global_batch, shard)
            logits = forward(batch).float()
            loss = loss_fn(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(loss.item())
            correct += int((logits.argmax(1) == labels[batch]).sum())
            seen += len(batch)
            epoch_ends = i == len(batches) - 1 or step >= total_steps
            if progress and not epoch_ends:  # the epoch's running loss and top-1, the last epoch's held-out top-1
                last_eval = history.eval_top1[-1] if history.eval_top1 else float("nan")
                progress(step, total_steps, loss=float(np.mean(losses)), top1=correct / seen, eval_top1=last_eval)
        probs = evaluate() if evaluate else None
        eval_top1 = top1(probs, eval_labels)
        point = (step, float(np.mean(losses)), correct / max(1, seen), eval_top1, optimizer.param_groups[-1]["lr"])
        history.add(*point)
        if progress:  # an epoch's last step is shown with that epoch's held-out top-1
            progress(step, total_steps, loss=point[1], top1=point[2], eval_top1=eval_top1)
        if board is not None:
            board.epoch(*point)
            if not math.isnan(eval_top1):
                board.confusion(step, eval_labels, probs.argmax(1))  # type: ignore[arg-type, union-attr]
        if on_epoch and on_epoch(history):
            break
    return history
