"""Progress bars with the time left, for every long loop (training epochs, explanations,
evaluation, sweeps, teacher caches): one look, one place."""

from __future__ import annotations

import math
import time
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
    """A bar over ``total`` steps; yields ``advance(info)``, called once per finished step. Where
    the console is not a terminal (output piped to a file or a notebook log), a live bar shows
    nothing: plain lines say the step, the time so far and the time left instead, at most one
    every 10 s (and the last)."""
    console = console or Console(stderr=True)
    if enabled and not console.is_terminal:
        t0, state = time.perf_counter(), {"done": 0, "said": -math.inf}

        def line(info: str = "") -> None:
            state["done"] += 1
            now, n = time.perf_counter() - t0, state["done"]
            if n == total or n == 1 or now - state["said"] >= 10:
                state["said"] = now
                left = now / n * (total - n)
                console.print(f"{description}: {n}/{total} {info} — {now:.0f} s so far, about {left:.0f} s left")
        yield line
        return
    with progress_bar(console, enabled) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda info="": bar.update(task, advance=1, info=info)
