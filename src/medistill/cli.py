"""The ``medistill`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from medistill.commands.models import models_app
from medistill.config import Override
from medistill.errors import MedistillError, crash_log

app = typer.Typer(help="Distil large medical image classifiers into small, fast, explainable students.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        from medistill import __version__

        print(f"medistill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Distil large medical image classifiers into small, fast, explainable students."""


app.add_typer(models_app, name="models")
console = Console(stderr=True)

from medistill.cli_options import (  # noqa: E402  (after the app: the shared options of every command)
    _AMP, _BATCH, _DEVICE, _EPOCHS, _FOLD, _FORCE, _INPUT_SIZE, _LABEL_FRACTION, _LR, _PRETRAINED, _PRINT, _SEED, _SET,
    _UNLABELED, _WORKERS, method_epilog,
)


def _overrides(data: Optional[str], model: Optional[list[str]], epochs: Optional[int], batch_size: Optional[int],
               seed: Optional[int], out: Optional[str], lr: Optional[float], input_size: Optional[int],
               sets: Optional[list[str]], device: Optional[str] = None, amp: Optional[str] = None,
               fold: Optional[int] = None, workers: Optional[int] = None, unlabeled: Optional[str] = None,
               label_fraction: Optional[float] = None) -> list[Override]:
    """Flags as typed (key, value) pairs, then the ``--set`` strings (parsed as YAML data)."""
    flags = {"data.name": data, "train.epochs": epochs, "train.batch_size": batch_size, "train.seed": seed,
             "out": out, "optim.lr": lr, "train.device": device, "train.amp": amp, "data.fold": fold,
             "data.num_workers": workers, "data.unlabeled": unlabeled, "data.label_fraction": label_fraction}
    # an empty --data/--out (an unset shell variable) is kept: the assembly refuses it by name
    return [(k, v) for k, v in flags.items() if v is not None] + list(sets or [])


def _device_sets(sets: Optional[list[str]], device: Optional[str], amp: Optional[str]) -> list[str]:
    """``--device``/``--amp`` of sweep and recipe as overrides of every run they make."""
    return list(sets or []) + ([f"train.device={device}"] if device else []) + ([f"train.amp={amp}"] if amp else [])


def _run(kind: str, config: Optional[Path], overrides: list[Override], model: Optional[list[str]], input_size: Optional[int],
         teachers: Optional[list[str]], method: Optional[str], resume: bool, download: bool,
         pretrained: bool = False, print_config: bool = False, baseline: bool | str | None = False,
         compare: Optional[str] = None, force: bool = False) -> None:
    from medistill.assemble import assemble_run, execute_run

    cfg = assemble_run(kind, config, overrides, models=model, input_size=input_size, teachers=teachers, method=method,
                       pretrained=pretrained, resume=resume, console=console)
    if method:
        console.print(f"method {method}: terms = {json.dumps([t.model_dump() for t in cfg.terms])}")
    if print_config:
        from medistill.config import dump_config

        print(dump_config(cfg), end="")
        return
    from medistill.assemble import BASELINE_ARMS

    if isinstance(baseline, str) and baseline not in BASELINE_ARMS:
        raise typer.BadParameter(f"--baseline {baseline!r}: use --baseline (the student alone) or --baseline selftrain")
    results = execute_run(cfg, resume=resume, download=download, console=console, baseline=baseline, compare=compare,
                          force=force)
    import os

    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 alone reports (the process group is gone by now)
        return
    summary = Path(cfg.out) / "summary.md"
    print(summary.read_text() if summary.is_file() else json.dumps(results, indent=2))
    from medistill.report import build_report

    print(f"run directory: {cfg.out}\nreport: {build_report([cfg.out])}")


def _method_names() -> list[str]:
    from medistill.presets import METHODS

    return list(METHODS)


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML config (optional: flags suffice)"),
    data: Optional[str] = typer.Option(None, "--data", help="MedMNIST name, .npz, image folder or CSV manifest"),
    model: Optional[list[str]] = typer.Option(None, "--model", help="timm model name or cnn5"),
    epochs: Optional[int] = _EPOCHS,
    batch_size: Optional[int] = _BATCH,
    seed: Optional[int] = _SEED,
    out: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/run)"),
    lr: Optional[float] = _LR,
    input_size: Optional[int] = _INPUT_SIZE,
    sets: Optional[list[str]] = _SET,
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    download: bool = typer.Option(False, "--download", help="download a missing MedMNIST file (needs network)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma list, e.g. 0,1,2: a seed ensemble, one run per seed "
                                        "under --out/seed-N plus ensemble.json and the ensemble's evaluation"),
    pretrained: bool = _PRETRAINED,
    device: Optional[str] = _DEVICE,
    amp: Optional[str] = _AMP,
    fold: Optional[int] = _FOLD,
    workers: Optional[int] = _WORKERS,
    print_config: bool = _PRINT,
    force: bool = _FORCE,
    label_fraction: Optional[float] = _LABEL_FRACTION,
) -> None:
    """Train a teacher or a student-only baseline with a supervised loss (or a seed ensemble)."""
    overrides = _overrides(data, model, epochs, batch_size, seed, out, lr, input_size, sets, device, amp, fold, workers,
                           label_fraction=label_fraction)
    if seeds is None or print_config:
        _run("train", config, overrides, model, input_size, None, None, resume, download, pretrained, print_config,
             force=force)
        return
    seed_list = _parse_seeds(seeds, ensemble=True)
    assert seed_list is not None
    if not out:
        raise MedistillError("--seeds needs --out ENSEMBLE_DIR")
    from medistill.commands.members import train_seed_ensemble

    train_seed_ensemble(config, overrides, seed_list, out, models=model, input_size=input_size, resume=resume,
                        download=download, pretrained=pretrained, console=console)
    _print_ensemble(Path(out))


def _parse_seeds(text: str | None, ensemble: bool = False) -> list[int] | None:
    """``--seeds 0,1,2`` of train (an ensemble: ≥ 2 distinct seeds), sweep and recipe."""
    if text is None:
        return None
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MedistillError(f"--seeds {text!r}: expected a comma list of integers, e.g. 0,1,2") from None
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise MedistillError(f"--seeds {text!r} repeats seed(s) {dup}: members would be identical")
    if ensemble and len(seeds) < 2:
        raise MedistillError(f"--seeds {text!r}: an ensemble needs at least 2 seeds")
    return seeds or None


def _print_ensemble(out: Path) -> None:
    print((out / "summary.md").read_text())
    print(f"ensemble: {out} (use it as one teacher: medistill distill --teacher {out} ...)")


@app.command()
def ensemble(
    members: list[Path] = typer.Argument(..., help="trained runs or model directories (at least 2)"),
    out: Path = typer.Option(..., "--out", help="ensemble directory (ensemble.json, metrics, summary)"),
    aggregation: str = typer.Option("prob_mean", "--aggregation", help="prob_mean (default) or logit_mean"),
) -> None:
    """Combine trained models into one teacher ensemble and evaluate it on their shared split."""
    from medistill.commands.evaluate import evaluate_ensemble
    from medistill.rundir import write_ensemble

    write_ensemble(out, list(members), aggregation)
    evaluate_ensemble(out)
    _print_ensemble(out)


@app.command(epilog=method_epilog())
def distill(
    config: Optional[Path] = typer.Argument(None, help="YAML config with teachers, students and terms"),
    teacher: Optional[list[str]] = typer.Option(None, "--teacher", help="teacher run, model or ensemble directory (repeatable)"),
    method: Optional[str] = typer.Option(None, "--method", help="preset (each listed below): " + ", ".join(_method_names())),
    data: Optional[str] = typer.Option(None, "--data", help="dataset (default: the teacher's data and split)"),
    model: Optional[list[str]] = typer.Option(None, "--model", "--student", help="student model (repeatable)"),
    epochs: Optional[int] = _EPOCHS,
    batch_size: Optional[int] = _BATCH,
    seed: Optional[int] = _SEED,
    out: Optional[str] = typer.Option(None, "--out", help="run directory (default runs/run)"),
    lr: Optional[float] = _LR,
    input_size: Optional[int] = typer.Option(None, "--input-size", help="the students' input side (default: their "
                                             "teachers', the largest if they differ)"),
    sets: Optional[list[str]] = _SET,
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    download: bool = typer.Option(False, "--download", help="download a missing MedMNIST file (needs network)"),
    pretrained: bool = _PRETRAINED,
    device: Optional[str] = _DEVICE,
    amp: Optional[str] = _AMP,
    fold: Optional[int] = _FOLD,
    workers: Optional[int] = _WORKERS,
    print_config: bool = _PRINT,
    force: bool = _FORCE,
    baseline: Optional[str] = typer.Option(None, "--baseline", metavar="[alone|selftrain]", help=(
        "also train the student alone (same data, split, schedule, seed; OUT/alone): the paired difference with a 95 % "
        "interval; `selftrain` also distils that student into a fresh one the same way (OUT/selftrain)")),
    compare: Optional[str] = typer.Option(None, "--compare", help="a run of the same student(s) trained alone on the same "
                                          "split: report the difference with a paired 95 % interval"),
    unlabeled: Optional[str] = _UNLABELED,
    label_fraction: Optional[float] = _LABEL_FRACTION,
) -> None:
    """Distil N teachers into M students with a list of loss terms. Without --data, the data and
    split are the teacher's."""
    _run("distill", config, _overrides(data, model, epochs, batch_size, seed, out, lr, input_size, sets, device, amp, fold,
                                       workers, unlabeled, label_fraction), model, input_size, teacher, method, resume, download, pretrained,
         print_config, baseline, compare, force)


@app.command()
def evaluate(
    target: Path = typer.Argument(..., help="run directory, student/model directory or weights file"),
    data: Optional[str] = typer.Option(None, "--data", help="another dataset (external validation); default: the run's own"),
    split: str = typer.Option("test", "--split", help="test (a split of --data) or all (every image of --data)"),
    class_map: Optional[list[str]] = typer.Option(None, "--class-map", help="DATA_CLASS=MODEL_CLASS for classes named "
                                                  "differently in --data (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write metrics here instead of beside the model"),
    latency: bool = typer.Option(True, "--latency/--no-latency"),
    device: Optional[str] = _DEVICE,
) -> None:
    """Evaluate saved students on the run's validation and test splits, or on another dataset
    (written under MODEL/external/NAME, never over the run's own results)."""
    from medistill.commands.evaluate import evaluate_target

    res = evaluate_target(target, data=data, out=out, latency=latency, split=split, class_map=class_map,
                          device=device or "auto")
    t = Table("model", "ACC", "bal. ACC", "macro-F1", "QWK", "AUROC", "ECE")
    for name, r in res.items():
        m = r["all" if split == "all" else "test"]
        t.add_row(name, *(f"{m[k]:.4f}" if m[k] is not None else "–" for k in ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "auroc", "ece")))
    Console().print(t)


@app.command()
def explain(
    run_dir: Path = typer.Argument(..., help="run directory (teachers from its config, students from students/)"),
    images: int = typer.Option(8, "--images", help="number of random images from the split"),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="instead: N images of every class"),
    methods: str = typer.Option("gradcam,scorecam,avgmap", "--methods", help="comma list of gradcam, gradcampp, layercam, scorecam, avgmap, shap"),
    split: str = typer.Option("test", "--split"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Score-CAM: keep the k highest-variance channels"),
    out: Optional[Path] = typer.Option(None, "--out"),
    layer: Optional[list[str]] = typer.Option(None, "--layer", help="MODEL=MODULE: the CAM layer of one model, e.g. mobilenetv3=blocks.4 (repeatable)"),
    compare: Optional[list[str]] = typer.Option(None, "--compare", help="NAME=DIR: also explain a model from elsewhere, e.g. a student trained without a teacher (repeatable)"),
    device: str = typer.Option("auto", "--device", help="where the maps are computed: auto (default: CUDA, then MPS, else CPU), cpu, cuda, cuda:N or mps"),
) -> None:
    """Explain every model of a run: overlays, faithfulness, agreement, explanation time."""
    from medistill.explain.run import explain_run

    bad = [v for v in (layer or []) + (compare or []) if "=" not in v]
    if bad:
        raise typer.BadParameter(f"{bad[0]!r} must look like NAME=VALUE (--layer MODEL=MODULE, --compare NAME=DIR)")
    report = explain_run(run_dir, images, per_class, [m.strip() for m in methods.split(",") if m.strip()], split, top_k,
                         out=out, layers=dict(v.split("=", 1) for v in layer or []),
                         compare=dict(v.split("=", 1) for v in compare or []), device=device)
    from medistill.explain.run import explain_markdown

    print(explain_markdown(report))


@app.command()
def sweep(
    config: Optional[Path] = typer.Argument(None, help="base config (teachers, students, data, ...)"),
    out: Path = typer.Option(..., "--out", help="sweep directory (one sub-directory per run)"),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma list of presets, e.g. umkd,umkd_no_sfa,dkd,kd"),
    grid: Optional[list[str]] = typer.Option(None, "--grid", help="key=v1,v2 (repeatable; cartesian product)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma list, e.g. 0,1,2"),
    sets: Optional[list[str]] = _SET,
    device: Optional[str] = _DEVICE,
    amp: Optional[str] = _AMP,
    baseline: bool = typer.Option(False, "--baseline", help="add cells of the same students trained alone and put the "
                                  "paired differences from them first in results.md"),
) -> None:
    """Run a resumable grid of runs and collect one results table (CSV + markdown)."""
    from medistill.commands.sweep import run_sweep

    run_sweep(config, out, [m for m in (methods or "").split(",") if m] or None, grid,
              _parse_seeds(seeds), _device_sets(sets, device, amp), console, baseline=baseline)
    print((out / "results.md").read_text())


@app.command()
def recipe(
    file: Path = typer.Argument(..., help="recipe YAML (configs/papers/*.yaml)"),
    only: Optional[str] = typer.Option(None, "--only", help="comma list of stage names"),
    sets: Optional[list[str]] = _SET,
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma list replacing the seeds of seeded stages, e.g. 0 for a first pass (stages that make a later stage's teachers keep theirs)"),
    device: Optional[str] = _DEVICE,
    amp: Optional[str] = _AMP,
) -> None:
    """Run a paper's protocol (teachers, students, sweeps) stage by stage; resumable."""
    from medistill.commands.recipe import run_recipe

    run_recipe(file, [s for s in (only or "").split(",") if s] or None, _device_sets(sets, device, amp), console,
               _parse_seeds(seeds))


@app.command()
def audit(
    data: str = typer.Argument(..., help="dataset (MedMNIST name, .npz, folder, CSV) or a run directory (its data and split)"),
    run: Optional[str] = typer.Option(None, "--run", help="a trained run, model or ensemble directory whose out-of-sample "
                                      "probabilities rank likely label errors (default: DATA itself when it is a run)"),
    oof: Optional[int] = typer.Option(None, "--oof", help="also score the training images: K-fold out-of-fold predictions"),
    near_threshold: int = typer.Option(4, "--near-threshold", help="pHash bits (of 64) within which two images are near-duplicates"),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="comma list naming the class ids 0…K−1"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for audit.json and label_issues.csv"),
) -> None:
    """Audit a dataset: label conflicts, copies and near-duplicates across splits, class counts,
    image shapes, and likely label errors from a trained run (cleanlab)."""
    from medistill.commands.audit import audit_data, print_audit

    if not 0 <= near_threshold <= 16:
        raise typer.BadParameter(f"--near-threshold {near_threshold}: use 0…16 bits of the 64-bit hash")
    if oof is not None and oof < 2:
        raise typer.BadParameter(f"--oof {oof}: out-of-fold predictions need K ≥ 2 folds")
    names = [c.strip() for c in class_names.split(",")] if class_names else None
    print_audit(audit_data(data, run, out, near_threshold, oof, class_names=names), console)


@app.command()
def report(run_dirs: list[Path] = typer.Argument(..., help="one run (a report) or several (a comparison)"),
           out: Optional[Path] = typer.Option(None, "--out", help="HTML file (default: RUN/report.html)")) -> None:
    """Write a self-contained HTML report of one or more runs."""
    from medistill.report import build_report

    print(build_report(run_dirs, out))


@app.command()
def export(target: Path = typer.Argument(..., help="run directory (first student), model directory or weights file"),
           fmt: str = typer.Option("onnx", "--format", help="onnx or torchscript"),
           out: Optional[Path] = typer.Option(None, "--out"),
           force: bool = typer.Option(False, "--force", help="replace an existing file named by --out")) -> None:
    """Export a student (preprocessing included, dynamic batch) and check it against PyTorch."""
    from medistill.commands.deploy import export_model

    r = export_model(target, fmt, out, force=force)
    print(f"{r['path']}  max |Δ| vs PyTorch = {r['max_abs_diff']:.2e} (batches {r['batches_checked']})")


@app.command()
def predict(model: Path = typer.Argument(..., help="run dir, model dir, weights file or exported .onnx"),
            images: list[Path] = typer.Argument(..., help="image files (any size or mode)"),
            cam: bool = typer.Option(False, "--cam", help="also write a Grad-CAM overlay PNG per image"),
            out: Optional[Path] = typer.Option(None, "--out", help="folder for CAM overlays"),
            device: Optional[str] = _DEVICE) -> None:
    """Predict classes and probabilities for image files."""
    from medistill.commands.deploy import predict_files

    for r in predict_files(model, images, cam, out, device=device or "cpu"):
        print(json.dumps(r))


def main() -> None:
    """The error boundary: a foreseeable failure (:class:`MedistillError`) is one line and exit
    code 2; anything else is a short message naming a log file with the traceback (exit 1),
    unless ``--debug`` (or ``MEDISTILL_DEBUG=1``) asks for the traceback itself."""
    import os

    debug = "--debug" in sys.argv[1:] or os.environ.get("MEDISTILL_DEBUG") == "1"
    from medistill.assemble import baseline_arm

    sys.argv = baseline_arm([a for a in sys.argv if a != "--debug"])
    try:
        app()
    except MedistillError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the boundary itself
        if debug:
            raise
        log = crash_log(' '.join(sys.argv[1:]))
        first = (str(e).splitlines() or [""])[0][:300]
        console.print(f"[bold red]internal error:[/] {type(e).__name__}: {first}\n"
                      f"This is probably a bug in medistill. Traceback: {log} (rerun with --debug to print it).", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
