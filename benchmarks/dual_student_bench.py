"""Uncertainty-aware dual-student KD on RetinaMNIST: ResNet-50 teacher (from retinamnist_kd.py),
ResNet-18 + MobileNetV2 students; the paper's ablation (hard labels; KD 0.3/0.7; + uncertainty
weighting; + peer learning) over seeds, and the epoch-time ratio dual-student / single-student
KD (teacher outputs cached for both).

    python benchmarks/dual_student_bench.py [--epochs 10] [--seeds 0 1 2] [--timing-only]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import RESULTS, epoch_times, machine, run, save
from medistill.distill.methods import method_terms

BASE = {"data": {"name": "retinamnist", "augment": "flip"}, "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 5e-4},
        "sched": {"name": "cosine", "warmup_epochs": 1}}
STUDENTS = [{"name": "resnet18", "model": "resnet18"}, {"name": "mobilenetv2", "model": "mobilenetv2_100"}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--runs", default=str(RESULTS / "runs"))
    a = ap.parse_args()
    root = Path(a.runs)
    teacher = [{"name": "resnet50", "checkpoint": str(root / "teacher_resnet50")}]
    res: dict = {"machine": machine(), "epochs": a.epochs, "runs": {}}

    def cfg(out: Path, students: list[dict], terms: list[dict], seed: int, epochs: int) -> dict:
        return {**BASE, "teachers": teacher, "students": students, "terms": terms, "out": str(out),
                "train": {"epochs": epochs, "batch_size": 64, "seed": seed, "progress": False, "latency": False}}

    single = root / "timing_kd_single"
    dual = root / "timing_dual_student"
    run(cfg(single, STUDENTS[:1], method_terms("kd_ce03", 2), 0, 2))
    run(cfg(dual, STUDENTS, method_terms("dual_student", 2), 0, 2))
    res["timing"] = {"kd_single_epoch_s": min(epoch_times(single)), "dual_student_epoch_s": min(epoch_times(dual))}
    res["timing"]["ratio"] = res["timing"]["dual_student_epoch_s"] / res["timing"]["kd_single_epoch_s"]
    save("dual_student", res)
    if not a.timing_only:
        for seed in a.seeds:
            for m in ("ce_only", "kd_ce03", "uncertainty_kd", "dual_student"):
                key = f"dual_{m}_s{seed}"
                res["runs"][key] = run(cfg(root / key, STUDENTS, method_terms(m, a.epochs), seed, a.epochs))
                save("dual_student", res)
    print(res["timing"])


if __name__ == "__main__":
    main()
