"""Progress bars with the time left, for every long loop (training epochs, explanations,
evaluation, sweeps, teacher caches): one look, one place."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(console: Console | None, enabled: bool = True) -> Progress:
    """A rich bar: description, bar, done/total, time elapsed and left, and an ``info`` field."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console or Console(stderr=True),
                    disable=not enabled, transient=True)


@contextmanager
def steps(console: Any, description: str, total: int, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A bar over ``total`` steps; yields ``advance(info)``, called once per finished step."""
    with progress_bar(console, enabled) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda info="": bar.update(task, advance=1, info=info)
