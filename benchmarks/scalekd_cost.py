"""What ScaleKD costs against logit KD from the same teacher: training-only projector parameters
and the epoch-time ratio, measured in one process with the two methods interleaved (so both
see the same machine load).

    python benchmarks/scalekd_cost.py --teacher runs/papers/scalekd_isic8/teacher/run
    python benchmarks/scalekd_cost.py --teacher RUN --students resnet18 cnn5 --repeats 3

Each measurement is one epoch of ``--max-samples`` training images (teacher outputs cached, as
in the recipe) through the ``medistill`` engine; the table reports the median epoch time of
each method and their ratio. Results: ``benchmarks/results/scalekd_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent

STUDENTS = {"resnet18": {"model": "resnet18", "input_size": 32, "small_input": "stride16"},
            "cnn5": {"model": "cnn5", "input_size": 32}}


def one_epoch(method: str, student: str, teacher: str, data: str, max_samples: int, out: Path) -> tuple[float, dict]:
    from medistill.config import load_config
    from medistill.distill.engine import Engine
    from medistill.distill.methods import method_terms

    terms = method_terms(method, 1) if method == "scalekd" else [{"type": "ce", "weight": 0.1},
                                                                  {"type": "kd", "weight": 0.9, "temperature": 4.0}]
    cfg = load_config(None, [], base={
        "data": {"name": data, "augment": "dihedral", "subset": {"max_samples": max_samples}},
        "teachers": [{"name": "teacher", "checkpoint": teacher}],
        "students": [{"name": "student", **STUDENTS[student]}],
        "terms": terms, "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05},
        "train": {"epochs": 1, "batch_size": 64, "threads": 1, "progress": False, "latency": False},
        "eval": {"bootstrap": 0}, "out": str(out)})
    Engine(cfg).run()
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    info = json.loads((out / "run_info.json").read_text())
    return rec["train_time_s"], info.get("term_parameters", {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", default=str(Path(os.environ.get("MEDISTILL_DATA_DIR", REPO.parent / "shared" / "data")) / "isic8_64.npz"))
    ap.add_argument("--students", nargs="+", default=["cnn5", "resnet18"])
    ap.add_argument("--max-samples", type=int, default=640)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    rows = []
    for s in a.students:
        times: dict[str, list[float]] = {"kd": [], "scalekd": []}
        params: dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(a.repeats):
                for m in ("kd", "scalekd"):
                    t, p = one_epoch(m, s, a.teacher, a.data, a.max_samples, Path(tmp) / f"{m}-{r}")
                    times[m].append(t)
                    params.update(p)
        kd, skd = statistics.median(times["kd"]), statistics.median(times["scalekd"])
        from medistill.models.factory import create_model

        student_params = sum(p.numel() for p in create_model(STUDENTS[s]["model"], 9, 3, 32,
                                                            small_input=STUDENTS[s].get("small_input", "auto")).parameters())
        rows.append({"student": s, "student_params": student_params, "projector_params": params.get("student.scalekd"),
                     "kd_epoch_s": kd, "scalekd_epoch_s": skd, "ratio": skd / kd, "times": times})
    result = {"command": "python benchmarks/scalekd_cost.py --teacher " + a.teacher, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "max_samples": a.max_samples, "rows": rows}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "scalekd_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| student | params (M) | ScaleKD projectors (M, training only) | KD epoch (s) | ScaleKD epoch (s) | ratio |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['student_params'] / 1e6:.2f} | {(r['projector_params'] or 0) / 1e6:.2f} | "
                     f"{r['kd_epoch_s']:.1f} | {r['scalekd_epoch_s']:.1f} | {r['ratio']:.2f}× |")
    md = "\n".join(lines) + f"\n\n{a.max_samples} training images per epoch, batch 64, 1 thread, median of {a.repeats}.\n"
    (ROOT / "results" / "scalekd_cost.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
