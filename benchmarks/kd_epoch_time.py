"""Re-measure the KD table's epoch times (docs/benchmarks.md, RetinaMNIST at 28 px, ResNet-18
student, batch 64, flips, 1 thread): student-only, KD with the teacher cache, KD with the teacher
run live — to check that an engine change made nothing slower on the CPU.

    python benchmarks/kd_epoch_time.py [--epochs 2] [--threads 1]

The teacher is a 1-epoch ResNet-50 (its quality does not matter for timing). Each run's fastest
epoch is kept (the least disturbed on a shared machine). Results: results/kd_epoch_time.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import epoch_times, machine, run, save
from retinamnist_kd import KD_TERMS, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher", default=None, help="an existing teacher run (default: train a 1-epoch ResNet-50)")
    ap.add_argument("--keep", default=None, help="keep the runs in this folder (default: a temporary one)")
    ap.add_argument("--name", default="kd_epoch_time", help="results file stem")
    ap.add_argument("--runs", nargs="+", default=["student_only", "kd_cached", "kd_live"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    r18 = [{"name": "resnet18", "model": "resnet18"}]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.keep or tmp)
        t_dir = Path(a.teacher) if a.teacher else root / "teacher"
        if not a.teacher:
            run(cfg(t_dir, 1, 0, [{"name": "resnet50", "model": "resnet50"}], latency=False))
        teacher = [{"name": "resnet50", "checkpoint": str(t_dir)}]
        runs = {"student_only": ([], [], "auto"), "kd_cached": (teacher, KD_TERMS, "on"),
                "kd_live": (teacher, KD_TERMS, "off")}
        times = {}
        for name, (tch, terms, cache) in runs.items():
            if name not in a.runs:
                continue
            run(cfg(root / name, a.epochs, 0, r18, tch, terms, teacher_cache=cache, latency=False,
                    threads=a.threads, cache_dir=str(root / "cache")))
            times[name] = min(epoch_times(root / name))
    result = {"machine": machine(), "epochs": a.epochs, "fastest_epoch_s": times,
              "ratio_to_student_only": {k: round(v / times["student_only"], 3) for k, v in times.items()}
              if "student_only" in times else {}}
    save(a.name, result)
    print(result)


if __name__ == "__main__":
    main()
