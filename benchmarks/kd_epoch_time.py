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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    r18 = [{"name": "resnet18", "model": "resnet18"}]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t_dir = root / "teacher"
        run(cfg(t_dir, 1, 0, [{"name": "resnet50", "model": "resnet50"}], latency=False))
        teacher = [{"name": "resnet50", "checkpoint": str(t_dir)}]
        runs = {"student_only": ([], [], "auto"), "kd_cached": (teacher, KD_TERMS, "on"),
                "kd_live": (teacher, KD_TERMS, "off")}
        times = {}
        for name, (tch, terms, cache) in runs.items():
            run(cfg(root / name, a.epochs, 0, r18, tch, terms, teacher_cache=cache, latency=False,
                    threads=a.threads, cache_dir=str(root / "cache")))
            times[name] = min(epoch_times(root / name))
    result = {"machine": machine(), "epochs": a.epochs, "fastest_epoch_s": times,
              "ratio_to_student_only": {k: round(v / times["student_only"], 3) for k, v in times.items()}}
    save("kd_epoch_time", result)
    print(result)


if __name__ == "__main__":
    main()
