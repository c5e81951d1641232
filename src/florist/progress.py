"""Progress bars for long steps, built on Rich.

Library functions take an optional ``progress(done, total)`` callback instead of
printing, so they stay quiet when imported; the CLI (or a user) turns a step
into a bar with :func:`progress_bar`. Training loops also pass running
statistics as keywords (``progress(step, total, loss=0.41, top1=0.88)``), which
the bar shows next to the count.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

log = logging.getLogger("florist")

#: Called as ``progress(done, total)``; training loops add keyword statistics
#: (``loss``, ``top1``, ``eval_top1``), so a callback given to them takes ``**stats``.
ProgressFn = Callable[..., None]

#: Seconds between plain log lines when stderr is not a terminal.
LOG_EVERY_S = 15.0

_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``41.3 images/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


def format_stats(stats: dict[str, float]) -> str:
    """``loss 0.412  top-1 88.0%  eval top-1 86.5%``: accuracies as percentages, others with 3 decimals."""
    parts = []
    for name, value in stats.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        label = name.replace("top1", "top-1").replace("_", " ")
        parts.append(f"{label} {value:.1%}" if "top1" in name else f"{label} {value:.3f}")
    return "  ".join(parts)


@contextmanager
def progress_bar(
    description: str, *, enabled: bool = True, unit: str = "images", log_every: float = LOG_EVERY_S
) -> Iterator[ProgressFn]:
    """Yield a ``progress(done, total, **stats)`` callback that drives a Rich bar.

    On a terminal the bar shows count, rate, elapsed and remaining time and any
    statistics passed as keywords. In a pipe or a log file a redrawn bar would be
    noise, so a step that lasts longer than ``log_every`` seconds writes a plain
    ``florist`` log line every ``log_every`` seconds and one when it completes.
    Nothing at all when ``enabled`` is false (``--quiet``).
    """
    if not enabled:
        yield lambda done, total, **stats: None
    elif not _console.is_terminal:
        yield _log_lines(description, unit, log_every)
    else:
        yield from _rich_bar(description, unit)


def _rich_bar(description: str, unit: str) -> Iterator[ProgressFn]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
    )
    with Progress(*columns, console=_console, transient=False) as bar:
        task = bar.add_task(description, total=None, stats="")

        def update(done: int, total: int, **stats: float) -> None:
            fields = {"stats": format_stats(stats)} if stats else {}
            bar.update(task, completed=done, total=total, **fields)

        yield update


def _log_lines(description: str, unit: str, every: float) -> ProgressFn:
    """A callback that logs ``Features (train, clean): 640/1200 (41.2 images/s, ETA 00:00:13)``.

    A step that ends within ``every`` seconds logs nothing (stderr stays clean for
    quick commands); a longer one logs every ``every`` seconds and once at its end.
    """
    start = time.monotonic()
    last = {"t": start, "done": -1, "logged": False}

    def update(done: int, total: int, **stats: float) -> None:
        now = time.monotonic()
        finished = total > 0 and done >= total
        if done == last["done"] or not (now - last["t"] >= every or (finished and last["logged"])):
            return
        last.update(t=now, done=done, logged=True)
        rate = done / max(now - start, 1e-9)
        speed = f" ({rate:,.1f} {unit}/s" if done else ""
        if speed and not finished:
            speed += f", ETA {time.strftime('%H:%M:%S', time.gmtime((total - done) / rate))}"
        extra = f"  {format_stats(stats)}" if stats else ""
        log.info("%s: %d/%d%s%s", description, done, total, speed + (")" if speed else ""), extra)

    return update


@contextmanager
def only_errors_logged() -> Iterator[None]:
    """Let only errors through the root logger while a third-party tool runs.

    Converters and quantizers log a line per graph pass or tensor at INFO or WARNING
    (ONNX Runtime's quantizer, litert-torch and the JAX lowering under it); the user
    asked for a file, and florist reports what it measured about it.
    """
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
