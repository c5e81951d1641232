"""The one optimisation loop shared by every training mode.

Head training and top-block tuning differ only in what a batch goes through
(a linear layer on features, or backbone blocks plus a head on activations) and
in their optimiser; shuffling, stepping, the learning-rate schedule, the
per-epoch curves and TensorBoard logging are the same and live here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .progress import ProgressFn


@dataclass
class History:
    """Per-epoch training curves, also written to TensorBoard."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train_top1: list[float] = field(default_factory=list)
    eval_top1: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    def add(self, step: int, loss: float, train_top1: float, eval_top1: float, lr: float, writer: Any = None) -> None:
        """Append one point (and log it when a TensorBoard ``writer`` is given)."""
        for name, value in zip(
            ("step", "loss", "train_top1", "eval_top1", "lr"), (step, loss, train_top1, eval_top1, lr)
        ):
            getattr(self, name).append(value)
        if writer is not None:
            writer.add_scalar("loss/train", loss, step)
            writer.add_scalar("top1/train", train_top1, step)
            writer.add_scalar("lr", lr, step)
            if not math.isnan(eval_top1):
                writer.add_scalar("top1/eval", eval_top1, step)


def run_steps(
    forward: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    total_steps: int,
    batch_size: int,
    seed: int,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    train_mode: Callable[[], None],
    evaluate: Callable[[], float] | None = None,
    writer: Any = None,
    progress: ProgressFn | None = None,
) -> History:
    """Run ``total_steps`` shuffled mini-batch steps, recording one history point per epoch.

    Args:
        forward: batch of example indices -> logits.
        labels: ``[N]`` class of each example.
        total_steps: optimisation steps (the last epoch may be partial).
        seed: seeds the shuffling (same seed -> same order).
        train_mode: puts the trained modules in training mode before each epoch.
        evaluate: returns held-out top-1 after each epoch (NaN when there is none).
    """
    generator = torch.Generator().manual_seed(seed)
    history = History()
    step = 0
    while step < total_steps:
        train_mode()
        losses, correct, seen = [], 0, 0
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            if step >= total_steps:
                break
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
            if progress:  # the epoch's running loss and top-1, the last epoch's held-out top-1
                last_eval = history.eval_top1[-1] if history.eval_top1 else float("nan")
                progress(step, total_steps, loss=float(np.mean(losses)), top1=correct / seen, eval_top1=last_eval)
        eval_top1 = evaluate() if evaluate else float("nan")
        lr = optimizer.param_groups[-1]["lr"]
        history.add(step, float(np.mean(losses)), correct / max(1, seen), eval_top1, lr, writer)
    return history


@torch.inference_mode()
def average_probabilities(
    forward: Callable[[torch.Tensor], torch.Tensor], views: Sequence[np.ndarray], batch_size: int = 256
) -> np.ndarray:
    """Softmax of ``forward`` on each view's array, averaged over views (test-time augmentation).

    ``views`` holds one ``[N, ...]`` array per view of the same N images (features or
    cached activations, any float dtype); the modules behind ``forward`` must already
    be in eval mode. Returns ``[N, classes]`` float32 (``[0, 0]`` for no images).
    """
    if not len(views) or not len(views[0]):
        return np.zeros((0, 0), dtype=np.float32)
    total = None
    for array in views:
        probs = torch.cat(
            [
                forward(torch.as_tensor(array[i : i + batch_size]).float()).float().softmax(1)
                for i in range(0, len(array), batch_size)
            ]
        )
        total = probs if total is None else total + probs
    return (total / len(views)).numpy()


def tta_top1(
    forward: Callable[[torch.Tensor], torch.Tensor], views: Sequence[np.ndarray], labels: np.ndarray | None
) -> float:
    """Top-1 of :func:`average_probabilities` against ``labels`` (NaN when there is nothing to score)."""
    if labels is None or not len(labels) or not len(views):
        return float("nan")
    return float(np.mean(average_probabilities(forward, views).argmax(1) == labels))
