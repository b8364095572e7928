"""UMKD on RetinaMNIST under both protocols: two ResNet-50 experts (seeds 0 and 1) → ResNet-18;
student-only, KD, DKD, UMKD and its ablations over seeds; epoch time and peak memory relative
to KD. The claim under test: UMKD raises mAcc over DKD under imbalance and each module helps.

    python benchmarks/umkd_bench.py [--epochs 10] [--seeds 0 1 2] [--ablation-seeds 0]
        [--protocols source-imbalanced target-imbalanced]

Student-only, DKD and UMKD run on every seed; KD and the ablations on --ablation-seeds (they cost
as much as UMKD each, and the 2-core budget does not stretch to 3 seeds of all seven).
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

from common import RESULTS, epoch_times, machine, run, save
from medistill.distill.methods import method_terms

HEADLINE = ["student_only", "dkd", "umkd"]
ABLATIONS = ["kd", "umkd_no_sfa", "umkd_no_cfa", "umkd_no_udd", "umkd_udd_no_uncertainty"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--expert-epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--protocols", nargs="+", default=["source-imbalanced", "target-imbalanced"])
    ap.add_argument("--ablation-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--methods", nargs="+", default=HEADLINE + ABLATIONS)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the students and UMKD's modules (2.3× faster here)")
    ap.add_argument("--runs", default=str(RESULTS / "runs"))
    ap.add_argument("--results", default="umkd", help="name of the result file under benchmarks/results (merged into)")
    a = ap.parse_args()
    root = Path(a.runs)
    prev = RESULTS / f"{a.results}.json"  # invocations per protocol add to one result file
    res: dict = json.loads(prev.read_text()) if prev.is_file() else {"runs": {}, "timing": {}}
    res.update(machine=machine(), epochs=a.epochs, bf16=a.bf16)
    for proto in a.protocols:
        tag = proto.split("-")[0]
        base = {"data": {"name": "retinamnist", "augment": "flip", "protocol": proto},
                "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 5e-4}, "sched": {"name": "cosine", "warmup_epochs": 1}}
        experts = []
        for s in (0, 1):
            out = root / f"umkd_{tag}_expert_s{s}"
            res["runs"][out.name] = run({**base, "students": [{"name": "expert", "model": "resnet50"}], "out": str(out),
                                         "train": {"epochs": a.expert_epochs, "batch_size": 64, "seed": s, "progress": False}})
            experts.append({"name": f"expert{s}", "checkpoint": str(out)})
        for seed in a.seeds:
            for m in [m for m in a.methods if m in HEADLINE or seed in a.ablation_seeds]:
                out = root / f"umkd_{tag}_{m}_s{seed}"
                cfg = {**base, "data": {**base["data"], "role": "student"}, "students": [{"name": "resnet18", "model": "resnet18"}],
                       "teachers": [] if m == "student_only" else experts, "terms": [] if m == "student_only" else method_terms(m, a.epochs),
                       "out": str(out), "train": {"epochs": a.epochs, "batch_size": 64, "seed": seed, "progress": False, "bf16": a.bf16}}
                res["runs"][out.name] = run(cfg)
                # the first run of a method is its timing; later seed invocations keep it
                res["timing"].setdefault(f"{tag}_{m}_epoch_s", min(epoch_times(out)))
                save(a.results, res)
    key = f"peak_rss_mb_{'_'.join(a.protocols)}"
    res[key] = max(res.get(key, 0.0), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    save(a.results, res)


if __name__ == "__main__":
    main()
