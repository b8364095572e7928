"""RetinaMNIST (28 px): ResNet-50 teacher → ResNet-18 student; student-only, KD, DKD over seeds,
plus (--extra) FitNet, AT, DML, ND (KD++) and two-teacher averaging over the same seeds; KD epoch time with and
without the teacher cache. Resumable: finished runs are reused.

    python benchmarks/retinamnist_kd.py [--epochs 10] [--seeds 0 1 2] [--teacher-epochs 10]
        [--extra [--extra-only dho nd_kdpp] [--extra-seeds 0]]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, epoch_times, machine, run, save
from medistill.distill.methods import method_terms

KD_TERMS = [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9, "temperature": 4.0}]
BASE = {
    "data": {"name": "retinamnist", "augment": "flip"},
    "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 5e-4},
    "sched": {"name": "cosine", "warmup_epochs": 1},
}


def cfg(out: Path, epochs: int, seed: int, students: list[dict], teachers: list[dict] | None = None,
        terms: list[dict] | None = None, **train) -> dict:
    return {**BASE, "students": students, "teachers": teachers or [], "terms": terms or [],
            "train": {"epochs": epochs, "batch_size": 64, "seed": seed, "progress": False, **train}, "out": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(RESULTS / "runs"))
    ap.add_argument("--extra", action="store_true", help="also FitNet, AT, DML, ND, two teachers, DHO")
    ap.add_argument("--extra-only", nargs="*", default=None, help="a subset of the extra methods")
    ap.add_argument("--extra-seeds", type=int, nargs="*", default=None, help="seeds of the extras (default: --seeds)")
    a = ap.parse_args()
    root = Path(a.out)
    r18 = [{"name": "resnet18", "model": "resnet18"}]
    t_dir = root / "teacher_resnet50"
    prev = RESULTS / "retinamnist_kd.json"  # runs of earlier invocations (other seeds or extras) are kept
    results: dict = json.loads(prev.read_text()) if prev.is_file() else {"runs": {}}
    results.update(machine=machine(), epochs=a.epochs, teacher_epochs=a.teacher_epochs)
    results["runs"]["teacher_resnet50"] = run(cfg(t_dir, a.teacher_epochs, 0, [{"name": "resnet50", "model": "resnet50"}]))
    teacher = [{"name": "resnet50", "checkpoint": str(t_dir)}]
    methods = {
        "student_only": ([], None),
        "kd": (teacher, KD_TERMS),
        "dkd": (teacher, [{"type": "ce"}, {"type": "dkd", "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 1.0}]),
    }
    for seed in a.seeds:
        for name, (tch, terms) in methods.items():
            key = f"{name}_s{seed}"
            results["runs"][key] = run(cfg(root / key, a.epochs, seed, r18, tch, terms))
            save("retinamnist_kd", results)
    # epoch time of KD relative to student-only, with and without the teacher cache (one run each, seed 0)
    nocache = root / "kd_nocache_timing"
    run(cfg(nocache, 1, 0, r18, teacher, methods["kd"][1], teacher_cache="off", latency=False))
    # fastest epoch over all seeds: the least disturbed by other work on a shared machine
    so = [t for sd in a.seeds for t in epoch_times(root / f"student_only_s{sd}")]
    kd = [t for sd in a.seeds for t in epoch_times(root / f"kd_s{sd}")]
    results["timing"] = {"student_only_epoch_s": min(so), "kd_cached_epoch_s": min(kd),
                         "kd_uncached_epoch_s": min(epoch_times(nocache))}
    save("retinamnist_kd", results)
    if a.extra:
        t2 = root / "teacher2_resnet34"
        results["runs"]["teacher2_resnet34"] = run(cfg(t2, a.teacher_epochs, 1, [{"name": "resnet34", "model": "resnet34"}]))
        extra = {
            "fitnet": (teacher, r18, [{"type": "ce"}, {"type": "fitnet", "weight": 100.0, "student_tap": "layer2", "teacher_tap": "layer2"}]),
            "at": (teacher, r18, [{"type": "ce"}, {"type": "at", "weight": 1000.0}]),
            "nd_kdpp": (teacher, r18, [{"type": "ce"}, {"type": "kd", "temperature": 4.0}, {"type": "nd", "weight": 2.0}]),
            "two_teacher_avg": (teacher + [{"name": "resnet34", "checkpoint": str(t2)}], r18,
                                [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9, "aggregate": "prob_mean"}]),
            "dml": ([], [{"name": "resnet18", "model": "resnet18"}, {"name": "peer", "model": "resnet18"}],
                    [{"type": "ce"}, {"type": "peer", "temperature": 1.0}]),
            "dho": (teacher, [{"name": "resnet18", "model": "resnet18", "kwargs": {"dual_head": True}}], method_terms("dho", a.epochs)),
        }
        unknown = set(a.extra_only or []) - set(extra)
        if unknown:
            raise SystemExit(f"unknown extra method(s) {sorted(unknown)}; choose from {sorted(extra)}")
        for seed in a.seeds if a.extra_seeds is None else a.extra_seeds:
            for name, (tch, st, terms) in extra.items():
                if a.extra_only and name not in a.extra_only:
                    continue
                results["runs"][f"{name}_s{seed}"] = run(cfg(root / f"{name}_s{seed}", a.epochs, seed, st, tch, terms))
                save("retinamnist_kd", results)
    print(json.dumps(results.get("timing", {}), indent=2))


if __name__ == "__main__":
    main()
