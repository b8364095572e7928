"""Shared helpers of the benchmark scripts: run a config through the engine, collect results."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from medistill.config import load_config
from medistill.distill.engine import Engine

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def run(cfg: dict[str, Any], skip_existing: bool = True) -> dict[str, Any]:
    """Run one config (resumable: a finished run directory is reused) and return its summary."""
    out = Path(cfg["out"])
    done = out / "summary.json"
    if skip_existing and done.is_file():
        return json.loads(done.read_text())
    if (out / "checkpoint_last.pt").is_file():
        eng = Engine(load_config(None, [], base=cfg), resume=True, console=Console(stderr=True))
    else:
        eng = Engine(load_config(None, [], base=cfg), console=Console(stderr=True))
    eng.run()
    return json.loads(done.read_text())


def epoch_times(run_dir: Path) -> list[float]:
    return [json.loads(ln)["train_time_s"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mean_std(values: list[float]) -> str:
    from medistill.eval.tables import mean_std_text

    return mean_std_text(values)


def save(name: str, obj: Any) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(obj, indent=2))
