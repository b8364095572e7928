"""The headroom benchmark: is a distilled student better than the same student trained alone?

On ISIC 8-class dermoscopy (``isic8_64.npz``, the cleaned set): a teacher ensemble of seeds, then students over
seeds, each alone with CE, alone with logit-adjusted CE, KD from the ensemble, DKD from the
ensemble and KD with logit-adjusted CE — for a ResNet-18 and for a small student at ≤ 1/10 of
one teacher's FLOPs. Every run goes through the ``medistill`` command line; a finished run is
reused and an interrupted one resumed, so the benchmark can be stopped and restarted at will
(and split over processes with ``--cells``).

    python benchmarks/headroom.py                      # everything, resumable
    python benchmarks/headroom.py --cells mnv3s:ce,mnv3s:kd --seeds 0 1 2
    python benchmarks/headroom.py --tune-kd mnv3s --cells mnv3s:kd_val   # KD τ, weight chosen on val
    python benchmarks/headroom.py --table-only         # rewrite the table from finished runs

Settings come from ``configs/bench/headroom_isic8.yaml`` (32 px, dihedral views so the teacher
outputs are cached, AdamW + cosine); ``--epochs`` and ``--set`` override them for every run.
Results: ``benchmarks/results/headroom.json`` and ``headroom.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"
BASE = REPO / "configs" / "bench" / "headroom_isic8.yaml"

STUDENTS = {
    "resnet18": {"model": "resnet18", "input_size": 32, "small_input": "stride16"},
    "mnv3s": {"model": "mobilenetv3_small_100", "input_size": 32, "small_input": "auto"},
    "cnn5": {"model": "cnn5", "input_size": 32},
}
# Each variant: (command, loss terms or None for `train` with train.loss).
KD = {"type": "kd", "weight": 0.9, "temperature": 4.0}
VARIANTS: dict[str, tuple[str, Any]] = {
    "ce": ("train", {"train.loss": "ce"}),
    "la": ("train", {"train.loss": "logit_adjusted"}),
    "kd": ("distill", [{"type": "ce", "weight": 0.1}, KD]),
    "dkd": ("distill", "dkd"),
    "kd_la": ("distill", [{"type": "logit_adjusted", "weight": 0.1}, KD]),
    # balanced KD: logit-adjusted CE and the same offset inside the KL (the student learns the
    # teacher's scores minus the prior); paired with logit-adjusted CE alone, its own supervised loss
    "kd_bal": ("distill", [{"type": "logit_adjusted", "weight": 0.1}, {**KD, "logit_adjust": 1.0}]),
    # the patient and consistent teacher (function matching): twice the schedule, and the same
    # student alone on that schedule as its baseline, so that the longer schedule is not credited to FM
    "ce_long": ("train", {"train.loss": "ce"}),
    "fm": ("distill", "fm"),
    # the self-training control (issue 44): balanced KD with the same student alone (its CE cell,
    # same seed: trained like the ensemble's members, with plain CE) as the only teacher, on the
    # same unlabelled pool: what any model's pseudo-labels give, without the ensemble's knowledge
    "self_kd_bal": ("distill", [{"type": "logit_adjusted", "weight": 0.1}, {**KD, "logit_adjust": 1.0}]),
    # the same with the LA-CE cell as teacher: its outputs are already prior-free, and balanced KD
    # subtracts the prior once more (kept to show the confound, not as the control)
    "self_la_kd_bal": ("distill", [{"type": "logit_adjusted", "weight": 0.1}, {**KD, "logit_adjust": 1.0}]),
}
# a distilled cell whose teacher is another cell of the same student and seed, not the ensemble
SELF_TEACHER = {"self_kd_bal": "ce", "self_la_kd_bal": "la"}
# the control each distilled cell is also paired with (the teacher's knowledge, not any teacher's)
CONTROL = {"kd_bal": "self_kd_bal"}
LABELS = {"ce": "alone, CE", "la": "alone, logit-adjusted CE", "kd": "KD from the ensemble",
          "dkd": "DKD from the ensemble", "kd_la": "KD + logit-adjusted CE",
          "ce_long": "alone, CE, 2× epochs", "fm": "function matching (mixup, KL τ=1), 2× epochs"}
EPOCH_FACTOR = {"ce_long": 2, "fm": 2}
# the alone cell each distilled cell is paired with (same schedule, seed and test images)
BASELINE = {"kd": "ce", "dkd": "ce", "kd_la": "ce", "fm": "ce_long", "kd_val": "ce", "kd_bal": "la", "self_kd_bal": "la", "self_la_kd_bal": "la"}
# KD's temperature and weight chosen on the validation split (``--tune-kd``): every pair of the
# grid trained on the tuning seeds, the pair with the best mean validation balanced accuracy kept
# as the cell ``kd_val``. The test split plays no part in the choice.
KD_GRID = {"temperature": (1.0, 2.0, 4.0, 8.0), "weight": (0.5, 0.9)}
LABELS["kd_val"] = "KD, τ and weight chosen on validation"
LABELS["kd_bal"] = "balanced KD (LA CE + KD with the student's logits + log prior)"
LABELS["self_kd_bal"] = "self-training control: balanced KD from the same student alone (CE) on the same pool"
LABELS["self_la_kd_bal"] = "balanced KD from the same student alone trained with LA CE (prior removed twice)"
DEFAULT_CELLS = ["mnv3s:ce", "mnv3s:kd", "mnv3s:ce_long", "mnv3s:fm", "mnv3s:la", "mnv3s:dkd", "mnv3s:kd_la",
                 "cnn5:ce", "cnn5:kd", "cnn5:ce_long", "cnn5:fm",
                 "resnet18:ce", "resnet18:kd", "resnet18:la", "resnet18:dkd", "resnet18:kd_la"]
METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "auroc", "ece")


def medistill(*args: str) -> None:
    cmd = [sys.executable, "-m", "medistill", *args]
    print("$ medistill " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = tree
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def base_config(epochs: int | None, sets: list[str]) -> dict[str, Any]:
    cfg = yaml.safe_load(BASE.read_text())
    cfg["data"]["name"] = str((REPO / cfg["data"]["name"]).resolve()) if not Path(cfg["data"]["name"]).is_absolute() else cfg["data"]["name"]
    if os.environ.get("MEDISTILL_DATA_DIR"):
        cand = Path(os.environ["MEDISTILL_DATA_DIR"]) / "isic8_64.npz"
        if cand.is_file():
            cfg["data"]["name"] = str(cand)
    if epochs:
        cfg["train"]["epochs"] = epochs
    for s in sets:
        k, v = s.split("=", 1)
        _set(cfg, k, yaml.safe_load(v))
    return cfg


def teachers(out: Path, cfg: dict[str, Any], seeds: list[int], sets: list[str] = ()) -> Path:
    """The teacher ensemble: the base config (ResNet-18 at 32 px) with ``sets`` applied to the
    teachers alone (e.g. ``students.0.input_size=64``: teachers that see the images larger)."""
    ens = out / "teachers"
    if (ens / "ensemble.json").is_file() and (ens / "metrics.json").is_file():
        return ens
    cfg = json.loads(json.dumps(cfg))
    for s in sets:
        k, v = s.split("=", 1)
        _set(cfg, k, yaml.safe_load(v))
    path = out / "configs" / "teacher.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    medistill("train", str(path), "--seeds", ",".join(map(str, seeds)), "--out", str(ens), "--resume")
    return ens


def _member_run(out: Path, student: str, variant: str, seed: int) -> Path | None:
    """A ResNet-18 alone with CE is exactly a teacher-ensemble member (same config, same seed,
    deterministic on the CPU): the member's run is that cell, not trained twice."""
    member = out / "teachers" / f"seed-{seed}"
    if student == "resnet18" and variant == "ce" and (member / "summary.json").is_file():
        return member
    return None


def grid_variant(temperature: float, weight: float) -> str:
    return f"kd_t{temperature:g}_w{weight:g}"


def _grid_point(variant: str) -> tuple[float, float] | None:
    m = re.fullmatch(r"kd_t([0-9.]+)_w([0-9.]+)", variant)
    return (float(m.group(1)), float(m.group(2))) if m else None


def variant_spec(variant: str) -> tuple[str, Any]:
    if (point := _grid_point(variant)) is not None:
        t, w = point
        return "distill", [{"type": "ce", "weight": round(1 - w, 6)}, {**KD, "weight": w, "temperature": t}]
    return VARIANTS[variant]


def alias(out: Path, student: str, variant: str) -> str:
    """The run folder a cell lives in: ``kd_val`` is the grid point chosen on validation, and the
    grid point equal to the ``kd`` cell's settings is that cell (the same run is never trained twice)."""
    if variant == "kd_val":
        chosen = json.loads(tuning_file(out, student).read_text())["chosen"]
        variant = grid_variant(chosen["temperature"], chosen["weight"])
    if _grid_point(variant) == (KD["temperature"], KD["weight"]):
        return "kd"
    return variant


def tuning_file(out: Path, student: str) -> Path:
    return out / "kd_tuning" / f"{student}.json"


def tune_kd(out: Path, cfg: dict[str, Any], ens: Path, student: str, seeds: list[int]) -> dict[str, Any]:
    """Train every KD grid point on ``seeds`` and keep the one with the best mean validation
    balanced accuracy of the checkpoint each run selected (on validation too)."""
    grid = {}
    for t in KD_GRID["temperature"]:
        for w in KD_GRID["weight"]:
            name = grid_variant(t, w)
            val, test = [], []
            for seed in seeds:
                run = cell(out, cfg, ens, student, name, seed)
                m = json.loads((run / "students" / "student" / "metrics.json").read_text())
                val.append(m["val"]["balanced_accuracy"])
                test.append(m["test"]["balanced_accuracy"])
            grid[name] = {"temperature": t, "weight": w, "val_balanced_accuracy": statistics.mean(val),
                          "test_balanced_accuracy": statistics.mean(test)}
    best = max(grid.values(), key=lambda g: g["val_balanced_accuracy"])
    res = {"student": student, "seeds": seeds, "criterion": "mean validation balanced accuracy",
           "grid": grid, "chosen": {"temperature": best["temperature"], "weight": best["weight"]}}
    tuning_file(out, student).parent.mkdir(parents=True, exist_ok=True)
    tuning_file(out, student).write_text(json.dumps(res, indent=2))
    return res


def cell(out: Path, cfg: dict[str, Any], ens: Path, student: str, variant: str, seed: int) -> Path:
    variant = alias(out, student, variant)
    run = out / f"{student}-{variant}" / f"seed-{seed}"
    if (run / "summary.json").is_file():
        return run
    if (member := _member_run(out, student, variant, seed)) is not None:
        return member
    c = json.loads(json.dumps(cfg))
    c["students"] = [{"name": "student", **STUDENTS[student]}]
    c["train"]["seed"] = seed
    c["train"]["epochs"] = c["train"]["epochs"] * EPOCH_FACTOR.get(variant, 1)
    kind, spec = variant_spec(variant)
    if kind == "train":
        for k, v in spec.items():
            _set(c, k, v)
    else:
        c["teachers"] = [{"name": "ensemble", "checkpoint": str(ens)}]
        if variant in SELF_TEACHER:
            c["teachers"] = [{"name": "self", "checkpoint": str(cell(out, cfg, ens, student, SELF_TEACHER[variant], seed))}]
        if isinstance(spec, str):
            from medistill.presets import method_settings, method_terms

            c["terms"] = method_terms(spec, c["train"]["epochs"])
            for k, v in method_settings(spec).items():
                _set(c, k, v)
        else:
            c["terms"] = spec
    path = out / "configs" / f"{student}-{variant}-{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(c, sort_keys=False))
    args = [kind, str(path), "--out", str(run)]
    if (run / "checkpoint_last.pt").is_file():
        args.append("--resume")
    medistill(*args)
    return run


def _mean_std(v: list[float]) -> tuple[float | None, float | None]:
    if not v:
        return None, None
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else None)


def collect(out: Path) -> dict[str, Any]:
    ens = out / "teachers"
    res: dict[str, Any] = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                           f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"), "cells": {}}
    if (ens / "metrics.json").is_file():
        m = json.loads((ens / "metrics.json").read_text())
        res["ensemble"] = {"test": {k: m["test"][k] for k in METRICS}, "flops": m["model"]["flops"],
                           "params": m["model"]["params"],
                           "members": {k: {x: v["test"][x] for x in METRICS} for k, v in m["members"].items()}}
        one = next(iter(m["members"].values()))["run"]
        single = json.loads((Path(one) / "students" / "student" / "metrics.json").read_text())
        res["teacher_member"] = {"flops": single["model"]["flops"], "params": single["model"]["params"],
                                 "latency_ms": (single.get("latency", {}).get("cpu_batch1") or {}).get("median_ms")}
    teacher_cfg = out / "configs" / "teacher.yaml"
    if teacher_cfg.is_file():
        tc = yaml.safe_load(teacher_cfg.read_text())
        data = tc.get("data", {})
        res["label_fraction"] = data.get("label_fraction")
        res["data"] = Path(data.get("name", "?")).name
        res["teacher_input_size"] = tc["students"][0].get("input_size")
    _collect_cells(out, res)
    for student in STUDENTS:
        best = strongest_alone(res, student)
        for key, c in res["cells"].items():
            if c["student"] == student and best and BASELINE.get(c["variant"]) and c["variant"] not in ("fm",):
                runs = sorted(p for p in (out / f"{student}-{alias(out, student, c['variant'])}").glob("seed-*")
                              if (p / "summary.json").is_file())
                c["paired_best"] = _paired(out, student, c["variant"], runs, res.get("ensemble"), base=best)
    return res


def _collect_cells(out: Path, res: dict[str, Any]) -> None:
    for student in STUDENTS:
        if tuning_file(out, student).is_file():
            res.setdefault("kd_tuning", {})[student] = json.loads(tuning_file(out, student).read_text())
        for variant in [*VARIANTS, "kd_val"]:
            if variant == "kd_val" and student not in res.get("kd_tuning", {}):
                continue
            d = out / f"{student}-{alias(out, student, variant)}"
            runs = sorted(p for p in d.glob("seed-*") if (p / "summary.json").is_file())
            done = {p.name for p in runs}
            runs += [m for s in range(10) if f"seed-{s}" not in done and (m := _member_run(out, student, variant, s))]
            if not runs:
                continue
            per_seed, times = {}, []
            model = None
            for r in runs:
                m = json.loads((r / "students" / "student" / "metrics.json").read_text())
                per_seed[r.name] = {k: m["test"][k] for k in METRICS}
                model = {"params": m["model"]["params"], "flops": m["model"]["flops"],
                         "latency_ms": (m.get("latency", {}).get("cpu_batch1") or {}).get("median_ms")}
                lines = [json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines() if ln.strip()]
                times.extend(ln["train_time_s"] for ln in lines)
            res["cells"][f"{student}:{variant}"] = {
                "student": student, "variant": variant, "seeds": per_seed, "model": model,
                "paired": _paired(out, student, variant, runs, res.get("ensemble")),
                **({"paired_control": _paired(out, student, variant, runs, None, CONTROL[variant])}
                   if variant in CONTROL else {}),
                "epoch_time_s": statistics.median(times) if times else None,   # median: robust to a paused epoch
                **{k: _mean_std([s[k] for s in per_seed.values() if s[k] is not None]) for k in METRICS},
            }


ALONE = ("ce", "la")   # the alone arms on the main schedule: the strongest one is the bar a teacher must clear


def strongest_alone(res: dict[str, Any], student: str) -> str | None:
    """The alone arm (CE or logit-adjusted CE) of ``student`` with the best mean test balanced
    accuracy over its seeds — the bar a distilled student is held to (chosen after the fact, so
    the comparison favours the alone side)."""
    arms = [(res["cells"][f"{student}:{v}"]["balanced_accuracy"][0], v) for v in ALONE if f"{student}:{v}" in res["cells"]]
    return max(arms)[1] if arms else None


def _paired(out: Path, student: str, variant: str, runs: list[Path], ens: dict[str, Any] | None,
            base: str | None = None) -> dict[str, Any] | None:
    """Per seed: the paired bootstrap difference in balanced accuracy from the same student alone
    (``base``, default ``BASELINE``) on the same test images, and the share of the gap to the
    ensemble it closed."""
    from medistill.eval.compare import compare_runs, gap_closed

    base = base or BASELINE.get(variant)
    if base is None:
        return None
    seeds = {}
    for r in runs:
        alone = out / f"{student}-{base}" / r.name
        alone = alone if (alone / "summary.json").is_file() else _member_run(out, student, base, int(r.name.split("-")[1]))
        if alone is None:
            continue
        m = compare_runs(r, alone)["student"]["metrics"]["balanced_accuracy"]
        closed = gap_closed(m["a"], m["b"], ens["test"]["balanced_accuracy"]) if ens else None
        seeds[r.name] = {"diff": m["diff"], "ci95": m["ci95"], "gap_closed": closed}
    if not seeds:
        return None
    diffs = [v["diff"] for v in seeds.values()]
    gaps = [v["gap_closed"] for v in seeds.values() if v["gap_closed"] is not None]
    return {"baseline": base, "seeds": seeds, "diff": _mean_std(diffs), "gap_closed": _mean_std(gaps),
            "seeds_above_zero": sum(v["ci95"][0] > 0 for v in seeds.values())}


def _f(ms: tuple[float | None, float | None] | list) -> str:
    m, s = ms
    if m is None:
        return "–"
    return f"{m:.3f}" + (f" ± {s:.3f}" if s is not None else "")


def table(res: dict[str, Any]) -> str:
    lines = []
    if "ensemble" in res:
        e = res["ensemble"]
        lines.append("Teachers (test split):\n")
        lines.append("| model | bal. ACC | ACC | macro-F1 | AUROC | ECE |\n|---|---|---|---|---|---|")
        members = list(e["members"].values())
        for k, v in e["members"].items():
            lines.append(f"| member {k.split('/')[0]} | " + " | ".join(f"{v[m]:.3f}" for m in METRICS) + " |")
        lines.append("| members, mean ± std | " + " | ".join(
            _f(_mean_std([v[m] for v in members])) for m in METRICS) + " |")
        lines.append("| **ensemble** | " + " | ".join(f"{e['test'][m]:.3f}" for m in METRICS) + " |\n")
    lines.append("Students (test split, mean ± std over seeds; checkpoints selected on validation):\n")
    lines.append("| student | trained | seeds | bal. ACC | Δ bal. ACC vs alone (paired) | gap closed | ACC | macro-F1 | AUROC | ECE | params (M) | MFLOPs | CPU ms (b=1) | epoch time ratio |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, c in res["cells"].items():
        base = res["cells"].get(f"{c['student']}:ce")
        ratio = (c["epoch_time_s"] / base["epoch_time_s"]) if base and base["epoch_time_s"] and c["epoch_time_s"] else None
        mdl = c["model"] or {}
        lat = mdl.get("latency_ms")
        pr = c.get("paired")
        if pr:
            one = next(iter(pr["seeds"].values()))
            m, sd = pr["diff"]
            delta = (f"{m:+.3f}" + (f" ± {sd:.3f}" if sd is not None else f" [{one['ci95'][0]:+.3f}, {one['ci95'][1]:+.3f}]")
                     + f"; {pr['seeds_above_zero']}/{len(pr['seeds'])} seeds > 0 (vs {LABELS[pr['baseline']]})")
            gap = _f(pr["gap_closed"])
        else:
            delta = gap = "–"
        lines.append(f"| {STUDENTS[c['student']]['model']} | {LABELS[c['variant']]} | {len(c['seeds'])} | "
                     + _f(c["balanced_accuracy"]) + f" | {delta} | {gap} | "
                     + " | ".join(_f(c[m]) for m in METRICS if m != "balanced_accuracy")
                     + f" | {mdl.get('params', 0) / 1e6:.2f} | {mdl.get('flops', 0) / 1e6:.0f} | "
                     + (f"{lat:.2f}" if lat else "–") + " | " + (f"{ratio:.2f}" if ratio else "–") + " |")
    best_rows = [(k, c) for k, c in res["cells"].items() if c.get("paired_best")]
    if best_rows:
        frac = res.get("label_fraction")
        lines.append(f"\nAgainst the strongest student alone (label fraction {frac if frac else 1}; per seed: paired "
                     "difference in balanced accuracy [95 % interval], gap closed):\n")
        lines.append("| student | trained | vs | Δ bal. ACC, mean ± std | per seed | gap closed |\n|---|---|---|---|---|---|")
        for _k, c in best_rows:
            pb = c["paired_best"]
            per = "; ".join(f"{v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for v in pb["seeds"].values())
            lines.append(f"| {STUDENTS[c['student']]['model']} | {LABELS[c['variant']]} | {LABELS[pb['baseline']]} | "
                         f"{_f(pb['diff'])} | {per} | {_f(pb['gap_closed'])} |")
    ctl_rows = [c for c in res["cells"].values() if c.get("paired_control")]
    if ctl_rows:
        lines.append("\nAgainst the self-training control (the same student alone as its own teacher, same method and "
                     "pool; per seed: paired difference in balanced accuracy [95 % interval]):\n")
        lines.append("| student | trained | vs | Δ bal. ACC, mean ± std | per seed | seeds > 0 |\n|---|---|---|---|---|---|")
        for c in ctl_rows:
            pc = c["paired_control"]
            per = "; ".join(f"{v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for v in pc["seeds"].values())
            lines.append(f"| {STUDENTS[c['student']]['model']} | {LABELS[c['variant']]} | {LABELS[pc['baseline']]} | "
                         f"{_f(pc['diff'])} | {per} | {pc['seeds_above_zero']}/{len(pc['seeds'])} |")
    for student, tu in res.get("kd_tuning", {}).items():
        ch = tu["chosen"]
        lines.append(f"\nKD grid for {STUDENTS[student]['model']} (seeds {tu['seeds']}; chosen on {tu['criterion']}: "
                     f"τ = {ch['temperature']:g}, weight = {ch['weight']:g}; test shown for information only):\n")
        lines.append("| τ | KD weight | val bal. ACC | test bal. ACC |\n|---|---|---|---|")
        for g in tu["grid"].values():
            mark = " **(chosen)**" if (g["temperature"], g["weight"]) == (ch["temperature"], ch["weight"]) else ""
            lines.append(f"| {g['temperature']:g} | {g['weight']:g}{mark} | {g['val_balanced_accuracy']:.3f} | "
                         f"{g['test_balanced_accuracy']:.3f} |")
    lines.append("\nΔ: balanced accuracy minus that of the same student alone on the same schedule, seed and test "
                 "images; mean ± std of the per-seed differences, and how many seeds' paired bootstrap 95 % intervals lie "
                 "above zero. Gap closed: (distilled − alone) / (ensemble − alone), per seed, mean ± std.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "runs" / "headroom"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cells", default=None, help="comma list of STUDENT:VARIANT (default: all, small student first)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="dotted override for every run")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--tune-kd", default=None, help="comma list of students whose KD τ and weight are chosen on "
                    "validation over the grid (then add the cell STUDENT:kd_val)")
    ap.add_argument("--tune-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--teacher-set", dest="teacher_sets", action="append", default=[],
                    help="dotted override for the teachers only, e.g. students.0.input_size=64")
    ap.add_argument("--results", default=None, help="name of the results files (default headroom: results/headroom.md)")
    a = ap.parse_args()
    out = Path(a.out)
    cfg = base_config(a.epochs, a.sets)
    if not a.table_only:
        ens = teachers(out, cfg, a.teacher_seeds, a.teacher_sets)
        cells = a.cells.split(",") if a.cells else DEFAULT_CELLS
        for student in (a.tune_kd.split(",") if a.tune_kd else []):
            tune_kd(out, cfg, ens, student, a.tune_seeds)
        for c in cells:
            student, variant = c.split(":")
            if variant == "kd_val" and not tuning_file(out, student).is_file():
                raise SystemExit(f"cell {c!r} needs the KD grid first: add --tune-kd {student}")
            if student not in STUDENTS or (variant not in VARIANTS and variant != "kd_val"):
                raise SystemExit(f"unknown cell {c!r}; students {list(STUDENTS)}, variants {list(VARIANTS)}")
        for seed in a.seeds:          # seeds outermost: a partial run already has every cell once
            for c in cells:
                student, variant = c.split(":")
                cell(out, cfg, ens, student, variant, seed)
    res = collect(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = a.results or "headroom"
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = table(res)
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
