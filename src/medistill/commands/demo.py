"""``make demo``: does distillation help? End to end in about five minutes on 2 CPU cores.

On ISIC 8-class dermoscopy (``isic8_64.npz``, imbalanced, nominal), at 32 px, with a quarter of
the training labels kept (``--label-fraction 0.25``; the other images are an unlabelled archive,
the setting in which a teacher adds most): a teacher ensemble of three small CNNs (one per seed)
trained on the labelled quarter, then one small student (MobileNetV3-Small, about a third of one
teacher's FLOPs) trained twice with the same epochs, seed and supervised loss — alone with
logit-adjusted CE on the labelled images, and distilled from the ensemble with balanced KD
(``--method kd_balanced``), which also learns the teacher's outputs on the unlabelled images
(teacher outputs cached over the eight dihedral views). The alone arm uses the method's own
supervised loss so that the difference is the teacher's, not the loss's. One table answers the first question a newcomer
asks: is the distilled student better than the same student trained alone? One pair per student
seed (three by default); the verdict is the mean of the seeds' paired differences and how many
seeds' intervals lie above zero — one seed of a short schedule is a coin the machine can flip
(issue 44: AVX2-only and AVX-512 machines gave different one-seed answers). The longer three-seed
answer is the headroom benchmark in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medistill.assemble import assemble_run, execute_run
from medistill.data import medmnist
from medistill.errors import DataError

METHOD = "kd_balanced"
METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "auroc", "ece")


def _default_data() -> str:
    for d in medmnist.search_dirs():
        if (d / "isic8_64.npz").is_file():
            return str(d / "isic8_64.npz")
    raise DataError("the demo's dataset isic8_64.npz was not found in "
                    f"{', '.join(str(d) for d in medmnist.search_dirs())}; set MEDISTILL_DATA_DIR or pass --data")


def _run(cfg: dict[str, Any], sets: list[str], method: str | None = None, compare: Path | None = None) -> dict[str, Any]:
    """One run of the demo; ``sets``: the demo's ``--set`` overrides, applied to every run."""
    con = Console(stderr=True)
    execute_run(assemble_run("auto", cfg, list(sets), method=method, console=con), console=con, compare=compare)
    return json.loads((Path(cfg["out"]) / "metrics.json").read_text())


def _answer(con: Console, seconds: float, ens: dict[str, Any], pairs: list[tuple[dict, dict, dict]],
            ens_arch: str, teacher: str, s_model: str) -> dict[str, Any]:
    """The demo's table (teachers, ensemble, the student alone and distilled per seed) and its
    verdict from the seeds' paired differences; returns the verdict's numbers."""
    table = Table(title=f"test split, {len(pairs)} student seed(s) ({seconds:.0f} s in all)")
    for col in ("model", "arch", "MFLOPs", "bal. ACC", "ACC", "macro-F1", "AUROC", "ECE"):
        table.add_column(col)

    def row(name: str, arch: str, flops: float | None, m: dict[str, Any]) -> None:
        table.add_row(name, arch, "–" if flops is None else f"{flops / 1e6:.0f}",
                      *("–" if m[k] is None else f"{m[k]:.3f}" for k in METRICS))

    for name, mm in ens["members"].items():
        row(f"teacher {name.split('/')[0]}", teacher, None, mm["test"])
    row("teacher ensemble", ens_arch, ens["model"]["flops"], ens["test"])
    for seed, (alone, kd, _c) in enumerate(pairs):
        row(f"student alone (logit-adjusted CE), seed {seed}", s_model, alone["model"]["flops"], alone["test"])
        row(f"student distilled ({METHOD}), seed {seed}", s_model, kd["model"]["flops"], kd["test"])
    con.print(table)
    from medistill.eval.compare import verdict_line

    for seed, (_a, _k, comparison) in enumerate(pairs):
        con.print(f"seed {seed}: " + verdict_line("student", comparison["students"]["student"]))
    verdict = seed_verdict([c["students"]["student"]["metrics"]["balanced_accuracy"] for *_x, c in pairs])
    con.print(f"[bold]Did distillation help?[/] {verdict['text']}")
    return verdict


def seed_verdict(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer over seeds: the mean ± std of the per-seed paired differences in balanced
    accuracy, and how many seeds' paired 95 % intervals lie above (below) zero. "Helped" needs a
    positive mean with most seeds' intervals above zero and none below; "hurt" the mirror;
    anything else is no difference these seeds and test images can resolve."""
    from medistill.eval.compare import seed_differences

    diffs = [m["diff"] for m in per_seed]
    above, below, n = sum(m["ci95"][0] > 0 for m in per_seed), sum(m["ci95"][1] < 0 for m in per_seed), len(per_seed)
    mean = sum(diffs) / n
    if mean > 0 and above * 2 > n and not below:
        word = "helped"
    elif mean < 0 and below * 2 > n and not above:
        word = "hurt"
    else:
        word = "made no difference that these seeds and test images can resolve"
    return {"word": word, "mean": mean, "diffs": diffs, "above": above, "below": below, "seeds": n,
            "text": f"distillation {word}: balanced accuracy difference {seed_differences(diffs)} over the student "
                    f"seeds (paired with the same seed alone); {above} of {n} seeds' paired 95 % intervals lie above "
                    f"zero, {below} below."}


def _settings(a: argparse.Namespace, data: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Every run's shared config, the teachers' model arguments and the student model; ``--quick``
    shrinks all of them (a smoke test)."""
    common: dict[str, Any] = {
        "data": {"name": data, "augment": "dihedral"},
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05},
        "sched": {"name": "cosine", "warmup_epochs": 1},
        "train": {"batch_size": 64, "seed": 0, "epochs": a.epochs, "progress": False},
    }
    if not 0 < a.label_fraction <= 1:
        raise DataError(f"--label-fraction {a.label_fraction}: use a share in (0, 1]")
    if a.label_fraction < 1:
        common["data"]["label_fraction"] = a.label_fraction
    t_kw: dict = {}
    s_model = a.student
    if a.quick:
        a.teacher, s_model, t_kw = "cnn5", "cnn5", {"widths": [8, 8, 16, 16, 16]}
        a.epochs, a.teacher_seeds, a.student_seeds = 1, a.teacher_seeds[:2], a.student_seeds[:2]
        common["train"]["epochs"] = 1
        common["data"].update(subset={"max_samples": 120}, max_eval_samples=60)
        common["train"]["latency"] = False
    return common, t_kw, s_model


def _student_pairs(common: dict[str, Any], student: dict[str, Any], root: Path, seeds: list[int],
                   sets: list[str]) -> list[tuple[dict, dict, dict]]:
    """One pair per student seed — alone with the method's own supervised loss (its --baseline
    setting), and distilled from the ensemble — with their paired comparison: the answer is the
    seeds', not one coin's."""
    from medistill.presets import method_settings

    loss = method_settings(METHOD).get("train.loss", "ce")
    pairs = []
    for seed in seeds:
        tr = {**common["train"], "seed": seed}
        alone_dir, kd_dir = root / f"alone-seed-{seed}", root / f"kd-seed-{seed}"
        alone = _run({**common, "students": [student], "out": str(alone_dir), "train": {**tr, "loss": loss}}, sets)
        kd = _run({**common, "students": [student], "out": str(kd_dir), "train": tr,
                   "teachers": [{"name": "ensemble", "checkpoint": str(root / "teachers")}]}, sets, method=METHOD,
                  compare=alone_dir)
        pairs.append((alone, kd, json.loads((kd_dir / "comparison.json").read_text())))
    return pairs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_runs")
    ap.add_argument("--data", default=None, help="default: isic8_64.npz from $MEDISTILL_DATA_DIR")
    ap.add_argument("--teacher", default="cnn5")
    ap.add_argument("--student", default="mobilenetv3_small_100")
    ap.add_argument("--size", type=int, default=32, help="input side every model sees")
    ap.add_argument("--teacher-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--student-seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="one alone/distilled pair per seed; the verdict is over the seeds")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--label-fraction", type=float, default=0.25,
                    help="share of the training labels kept (teachers and the alone arm see only those; the distilled "
                         "student also learns the teacher's outputs on the other images); 1: every label")
    ap.add_argument("--quick", action="store_true", help="tiny models and subsets (smoke test)")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="dotted override for every run, e.g. --set train.teacher_amp=off (repeatable)")
    a = ap.parse_args(argv)
    con = Console(width=max(Console().width, 110))
    data = a.data or _default_data()
    root = Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    common, t_kw, s_model = _settings(a, data)
    s_kw = t_kw if a.quick else {}
    labels = f"{a.label_fraction:.0%} of the training labels, the rest unlabelled" if a.label_fraction < 1 else "every label"
    con.print(f"[bold]medistill demo[/] — does distillation help? data={data} at {a.size} px, {labels}; teachers: "
              f"{len(a.teacher_seeds)}× {a.teacher} (one per seed), student {s_model}; {a.epochs} epochs each; "
              f"runs in {root}")
    t0 = time.perf_counter()
    members = []
    for seed in a.teacher_seeds:
        d = root / "teachers" / f"seed-{seed}"
        _run({**common, "students": [{"name": "teacher", "model": a.teacher, "input_size": a.size, "kwargs": t_kw}],
              "train": {**common["train"], "seed": seed}, "out": str(d)}, a.sets)
        members.append(d)
    from medistill.commands.evaluate import evaluate_ensemble
    from medistill.rundir import write_ensemble

    write_ensemble(root / "teachers", members)
    ens = evaluate_ensemble(root / "teachers")
    student = {"name": "student", "model": s_model, "input_size": a.size, "kwargs": s_kw}
    pairs = _student_pairs(common, student, root, a.student_seeds, a.sets)
    seconds = time.perf_counter() - t0
    verdict = _answer(con, seconds, ens, pairs, f"{len(members)}× {a.teacher}", a.teacher, s_model)
    from medistill.io import write_json
    from medistill.report import build_report

    write_json(root / "verdict.json", {**verdict, "seconds": round(seconds, 1), "student_seeds": a.student_seeds})
    report = build_report([root / f"alone-seed-{a.student_seeds[0]}", root / f"kd-seed-{a.student_seeds[0]}"],
                          root / "report.html")
    con.print(f"run directories: {root}")
    con.print(f"HTML report (open in a browser): {report.resolve()}")


if __name__ == "__main__":
    main()
