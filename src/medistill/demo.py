"""``make demo``: the main job end to end on RetinaMNIST in about ten minutes on 2 CPU cores.

Trains a ResNet-34 teacher, distils it into ResNet-18 students with KD and with DKD (teacher
outputs cached over flip views), evaluates everything on the untouched test split and prints
one comparison table. Epochs are chosen to fit the time budget and printed; they are far from
converged — the benchmarks in docs/benchmarks.md use longer schedules and three seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medistill.config import load_config
from medistill.distill.engine import Engine
from medistill.distill.methods import method_terms


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_runs")
    ap.add_argument("--data", default="retinamnist")
    ap.add_argument("--teacher", default="resnet34")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--teacher-epochs", type=int, default=5)
    ap.add_argument("--student-epochs", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="tiny models and subsets (smoke test)")
    a = ap.parse_args(argv)
    con = Console(width=max(Console().width, 110))
    out = Path(a.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = out / stamp
    common = {"data": {"name": a.data, "augment": "flip"},
              "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 5e-4},
              "sched": {"name": "cosine", "warmup_epochs": 0.5},
              "train": {"batch_size": 64, "seed": 0}}
    kw: dict = {}
    if a.quick:
        a.teacher = a.student = "cnn5"
        kw = {"widths": [8, 8, 16, 16, 16]}
        a.teacher_epochs = a.student_epochs = 1
        common["data"].update(subset={"max_samples": 120}, max_eval_samples=60)
        common["train"]["latency"] = False
    con.print(f"[bold]medistill demo[/] data={a.data} teacher={a.teacher} ({a.teacher_epochs} epochs) → "
              f"student={a.student} ({a.student_epochs} epochs) with KD and DKD; runs in {root}")
    t0 = time.perf_counter()
    teacher_cfg = {**common, "students": [{"name": "teacher", "model": a.teacher, "kwargs": kw}],
                   "train": {**common["train"], "epochs": a.teacher_epochs}, "out": str(root / "teacher")}
    Engine(load_config(None, [], base=teacher_cfg), console=Console(stderr=True)).run()
    rows = {"teacher": json.loads((root / "teacher" / "metrics.json").read_text())}
    for method in ("kd", "dkd"):
        cfg = {**common, "teachers": [{"name": "teacher", "checkpoint": str(root / "teacher")}],
               "students": [{"name": method, "model": a.student, "kwargs": kw}],
               "terms": method_terms(method, a.student_epochs),
               "train": {**common["train"], "epochs": a.student_epochs}, "out": str(root / method)}
        con.print(f"{method}: terms {json.dumps(cfg['terms'])}")
        Engine(load_config(None, [], base=cfg), console=Console(stderr=True)).run()
        rows[method] = json.loads((root / method / "metrics.json").read_text())
    table = Table(title=f"RetinaMNIST test split ({time.perf_counter() - t0:.0f} s in all)")
    for col in ("model", "arch", "params (M)", "ACC", "bal. ACC", "macro-F1", "QWK", "AUROC", "ECE"):
        table.add_column(col)
    for name, m in rows.items():
        t = m["test"]
        table.add_row(name, m["model"]["arch"], f"{m['model']['params'] / 1e6:.2f}",
                      *(f"{t[k]:.3f}" if t[k] is not None else "–" for k in ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "auroc", "ece")))
    con.print(table)
    from medistill.report import build_report

    report = build_report([root / "teacher", root / "kd", root / "dkd"], root / "report.html")
    con.print(f"run directories: {root}")
    con.print(f"HTML report (open in a browser): {report.resolve()}")


if __name__ == "__main__":
    main()
