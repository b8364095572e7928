"""``medistill sweep``: run a grid of configs (methods × overrides × seeds), resumably, and
collect every run's test metrics into one table (CSV + markdown, mean ± std over seeds)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from medistill.assemble import assemble_run, baseline_config
from medistill.distill.engine import Engine
from medistill.distill.methods import supervised_terms
from medistill.eval.compare import compare_runs, seed_differences
from medistill.rundir import read_run_json, student_dir
from medistill.errors import ConfigError
from medistill.eval.tables import STUDENT_ROLES
from medistill.io import write_text

ALONE = "alone"   # the sweep method of the students trained alone (--baseline)
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "auroc", "ece")


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)


def sweep_cells(methods: list[str] | None = None, grid: list[str] | None = None,
                seeds: list[int] | None = None) -> list[tuple[str, str | None, tuple[tuple[str, str], ...], int | None]]:
    """(run directory name, method, grid point, seed) of every cell, in run order. Recipes use
    the names to check that a later stage's checkpoints are runs an earlier stage makes."""
    axes: list[list[tuple[str, str]]] = []
    for g in grid or []:
        if "=" not in g:
            raise ConfigError(f"--grid {g!r} must look like key=v1,v2")
        key, vals = g.split("=", 1)
        axes.append([(key, v) for v in vals.split(",")])
    cells = []
    for method in methods or [None]:
        for point in itertools.product(*axes) if axes else [()]:
            for seed in seeds or [None]:
                parts = ([method] if method else []) + [f"{k.split('.')[-1]}={v}" for k, v in point] + ([f"seed={seed}"] if seed is not None else [])
                cells.append((_slug("_".join(parts) or "run"), method, point, seed))
    return cells


def run_sweep(config: str | Path | None, out: str | Path, methods: list[str] | None = None,
              grid: list[str] | None = None, seeds: list[int] | None = None, overrides: list[str] | None = None,
              console: Console | None = None, baseline: bool = False) -> list[dict[str, Any]]:
    """Each cell = (method, grid point, seed) → ``out/<cell>``; finished cells are skipped,
    interrupted ones resumed. ``baseline`` adds the cells of method "alone" (the same students,
    no teacher, no distillation term), and every other cell is compared with the alone cell of
    its grid point and seed on the same test images (paired bootstrap). Returns one row per run
    and writes ``out/results.{csv,md}``."""
    console = console or Console(stderr=True)
    out = Path(out)
    rows = []
    cells = sweep_cells(([ALONE] if baseline else []) + list(methods or [None]), grid, seeds)
    spent: list[float] = []     # seconds per cell trained in this call: the estimate of the time left
    for i, (name, method, point, seed) in enumerate(cells):
        ov = list(overrides or []) + [f"{k}={v}" for k, v in point] + [f"out={out / name}"]
        if seed is not None:
            ov.append(f"train.seed={seed}")
        # the alone cell is assembled like the first method's (its checks pass), then loses teachers and terms
        cfg = assemble_run("auto", config, ov, method=(methods or [None])[0] if method == ALONE else method)
        if method == ALONE:
            cfg = baseline_config(cfg, out / name)
        run_dir = out / name
        if not (run_dir / "summary.json").is_file():
            left = f"; about {_duration(statistics.mean(spent) * (len(cells) - i))} left" if spent else ""
            console.print(f"[bold]sweep[/] {name} (cell {i + 1}/{len(cells)}{left})")
            t0 = time.perf_counter()
            Engine(cfg, resume=(run_dir / "checkpoint_last.pt").is_file(), console=console).run()
            spent.append(time.perf_counter() - t0)
        summary = read_run_json(run_dir / "summary.json")
        for model, r in summary.items():
            if r["role"] not in STUDENT_ROLES:
                continue
            val = json.loads((student_dir(run_dir, model) / "metrics.json").read_text())["val"]
            # without a named method, the terms say what the cell trained (e.g. "hybrid" vs "ce")
            label = method or "+".join(t.type for t in cfg.terms or supervised_terms(cfg) if t.student in (None, model))
            rows.append({"run": name, "method": label, **{k: v for k, v in point}, "seed": seed,
                         "student": model, **{m: r["test"][m] for m in METRICS},
                         f"val_{cfg.train.select_metric}": val.get(cfg.train.select_metric),
                         "params": r["model"]["params"]})
    if baseline:
        _paired_with_alone(rows, out, cells)
    write_text(out / "results.csv", _csv(rows))
    keys = [g.split("=", 1)[0] for g in grid or []]
    # Cross-validation folds are pooled like seeds: one row per setting, mean ± std over folds.
    pooled = [k for k in keys if k != "data.fold"]
    md = aggregate_markdown(rows, pooled, over="folds × seeds" if "data.fold" in keys else "seeds")
    if baseline:
        md = vs_alone_markdown(rows, pooled) + "\n" + md
    write_text(out / "results.md", md)
    return rows


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _paired_with_alone(rows: list[dict[str, Any]], out: Path, cells: list[tuple]) -> None:
    """Add to each distilled row its paired difference from the alone cell of the same grid point
    and seed: ``vs_alone_bal_acc`` and its 95 % interval (``vs_alone_ci_lo``/``_hi``)."""
    alone = {(point, seed): name for name, method, point, seed in cells if method == ALONE}
    runs = {name: (method, point, seed) for name, method, point, seed in cells}
    done: dict[str, dict[str, Any]] = {}
    for r in rows:
        method, point, seed = runs[r["run"]]
        if method == ALONE or (point, seed) not in alone:
            continue
        if r["run"] not in done:
            done[r["run"]] = compare_runs(out / r["run"], out / alone[(point, seed)])
        m = done[r["run"]].get(r["student"], {}).get("metrics", {}).get("balanced_accuracy")
        if m:
            r.update(vs_alone_bal_acc=m["diff"], vs_alone_ci_lo=m["ci95"][0], vs_alone_ci_hi=m["ci95"][1])


def vs_alone_markdown(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """The verdict table first: per (method, grid point, student), the per-seed balanced-accuracy
    differences from the same student alone — mean ± std over seeds, and how many seeds' paired
    intervals lie above / below zero."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if "vs_alone_bal_acc" in r:
            groups.setdefault((r["method"], *(r.get(k) for k in keys), r["student"]), []).append(r)
    head = ["method", *keys, "student", "Δ bal. ACC vs alone", "seeds with interval > 0", "seeds with interval < 0"]
    lines = ["**Did distillation help?** Balanced accuracy minus that of the same student trained alone "
             "(same grid point, seed and test images):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, rs in groups.items():
        diffs = [r["vs_alone_bal_acc"] for r in rs]
        ci = "" if len(rs) > 1 else f" [{rs[0]['vs_alone_ci_lo']:+.3f}, {rs[0]['vs_alone_ci_hi']:+.3f}]"
        lines.append("| " + " | ".join(str(x) for x in g) + f" | {seed_differences(diffs)}{ci} | "
                     f"{sum(r['vs_alone_ci_lo'] > 0 for r in rs)}/{len(rs)} | {sum(r['vs_alone_ci_hi'] < 0 for r in rs)}/{len(rs)} |")
    return "\n".join(lines) + ("\n\nOver seeds: mean ± std of the per-seed differences; one seed: its paired bootstrap "
                               "95 % interval.\n" if groups else "\n\n(no distilled cell had an alone cell to compare with)\n")


def _csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def aggregate_markdown(rows: list[dict[str, Any]], keys: list[str], over: str = "seeds") -> str:
    """One row per (method, grid point without the pooled axes, student): the selection metric
    and test metrics as mean ± std over the pooled runs (``over``: seeds, or folds × seeds)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], *(r.get(k) for k in keys), r["student"]), []).append(r)
    val_key = next((k for k in (rows[0] if rows else {}) if k.startswith("val_")), None)
    head = ["method", *keys, "student", "n runs" if over != "seeds" else "n seeds", *([val_key + " (selection)"] if val_key else []), *[f"test {m}" for m in METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = None
    if val_key:
        means = {g: statistics.mean([r[val_key] for r in rs if r[val_key] is not None] or [float("-inf")]) for g, rs in groups.items()}
        best = max(means, key=means.get) if means else None
    for g, rs in groups.items():
        cells = []
        if val_key:
            vals = [r[val_key] for r in rs if r[val_key] is not None]
            cells.append(("**" if g == best else "") + (f"{statistics.mean(vals):.3f}" if vals else "–") + ("**" if g == best else ""))
        for m in METRICS:
            vals = [r[m] for r in rs if r[m] is not None]
            cells.append("–" if not vals else f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""))
        lines.append("| " + " | ".join([str(x) for x in g[:-1]] + [str(g[-1]), str(len(rs))] + cells) + " |")
    return "\n".join(lines) + f"\n\nTest metrics: mean ± std over {over} (the spread of training runs, not a confidence interval).\n"
