"""Progress reporting: Rich bars on a terminal, periodic plain log lines elsewhere, stats from training."""

from __future__ import annotations

import logging

import numpy as np
import torch

from florist.progress import format_stats, progress_bar
from florist.training.loop import Plan, Watch, run_steps


def test_not_a_terminal_gives_plain_log_lines(caplog) -> None:
    caplog.set_level(logging.INFO, logger="florist")
    with progress_bar("Features (train, clean)", log_every=0) as bar:  # pytest's stderr is not a terminal
        for done in range(0, 5):
            bar(done, 4)
        bar(4, 4)  # repeated final call: logged once
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "Features (train, clean): 0/4"
    assert lines[1].startswith("Features (train, clean): 1/4 (") and "images/s, ETA" in lines[1]
    assert lines[-1].startswith("Features (train, clean): 4/4 (") and "ETA" not in lines[-1]
    assert len(lines) == 5


def test_long_steps_log_periodically_and_at_the_end(caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="florist")
    clock = iter(range(1000))  # one second passes per reading of the clock
    monkeypatch.setattr("florist.progress.time.monotonic", lambda: next(clock))
    with progress_bar("Training head", unit="steps", log_every=30) as bar:
        for step in range(1, 101):
            bar(step, 100, loss=0.5, top1=0.25)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == [f"Training head: {n}/100" for n in (30, 60, 90, 100)]
    assert lines[0] == "Training head: 30/100 (1.0 steps/s, ETA 00:01:10)  loss 0.500  top-1 25.0%"


def test_quick_steps_log_nothing(caplog) -> None:
    caplog.set_level(logging.INFO, logger="florist")
    with progress_bar("Checking images", log_every=3600) as bar:
        for done in range(1, 25):
            bar(done, 24)
    assert not caplog.records


def test_quiet_logs_nothing(caplog) -> None:
    caplog.set_level(logging.INFO, logger="florist")
    with progress_bar("Checking images", enabled=False) as bar:
        bar(1, 1, loss=1.0)
    assert not caplog.records


def test_format_stats() -> None:
    stats = {"loss": 0.41234, "top1": 0.875, "eval_top1": float("nan")}
    assert format_stats(stats) == "loss 0.412  top-1 87.5%"  # NaN: no eval yet
    assert format_stats({"eval_top1": 0.5}) == "eval top-1 50.0%"


def test_training_steps_report_loss_and_accuracy() -> None:
    """Every step reports the epoch's running loss and top-1, and the last epoch's eval top-1."""
    torch.manual_seed(0)
    x = torch.randn(40, 4)
    y = (x[:, 0] > 0).long()
    head = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    calls = []
    history = run_steps(
        lambda batch: head(x[batch]),
        y,
        Plan(total_steps=10, batch_size=8, seed=0),
        loss_fn=torch.nn.CrossEntropyLoss(),
        optimizer=opt,
        schedule=torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
        train_mode=head.train,
        evaluate=lambda: np.eye(2, dtype=np.float32)[[0, 1, 1, 1]],  # 3 of 4 right
        watch=Watch(
            eval_labels=np.array([1, 1, 1, 1]), progress=lambda done, total, **stats: calls.append((done, total, stats))
        ),
    )
    assert [c[0] for c in calls] == list(range(1, 11))
    assert all(c[1] == 10 for c in calls)
    epoch_ends = [c[2] for c in calls if c[0] in (5, 10)]  # 40 examples / 8 = 5 steps per epoch
    assert [s["loss"] for s in epoch_ends] == history.loss
    assert [s["top1"] for s in epoch_ends] == history.train_top1
    assert all(np.isnan(c[2]["eval_top1"]) for c in calls[:4])  # nothing evaluated yet in the first epoch
    assert all(c[2]["eval_top1"] == 0.75 for c in calls[4:])  # each epoch's last step shows its own eval
    assert calls[-1][2]["eval_top1"] == history.eval_top1[-1]
