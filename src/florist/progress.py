"""Progress bars for long steps, built on Rich.

Library functions take an optional ``progress(done, total)`` callback instead of
printing, so they stay quiet when imported; the CLI (or a user) turns a step
into a bar with :func:`progress_bar`.
"""

from __future__ import annotations

import logging
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

#: Called as ``progress(done, total)``.
ProgressFn = Callable[[int, int], None]

_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``41.3 images/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, *, enabled: bool = True, unit: str = "images") -> Iterator[ProgressFn]:
    """Yield a ``progress(done, total)`` callback that drives a Rich bar (or does nothing).

    The bar shows count, rate and time left. It is drawn only on a terminal:
    in a pipe or a log file it would be noise, so nothing is printed there.
    """
    if not enabled or not _console.is_terminal:
        yield lambda done, total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
