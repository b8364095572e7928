"""The Python API: train and distil from a notebook, without the command line.

    from medistill.api import distill, train

    run = train(data="isic8_64.npz", model="resnet18", epochs=10, out="runs/t18")
    kd = distill(teachers=[run.out], data="isic8_64.npz", model="mobilenetv3_small_100",
                 method="kd", epochs=10, out="runs/kd")
    kd.metrics["test"]["balanced_accuracy"]

A teacher may be a run, model or ensemble directory, a ``(timm_name, weights_file)`` pair, or an
``nn.Module`` in memory (it receives the batch in [0, 1], resized to the data's size and
normalised to [-1, 1]; pass ``teacher_norm="imagenet"`` for ImageNet statistics). Everything
else is the same configuration the CLI builds: ``config`` is a dict of config keys (or a YAML
path) and ``overrides`` a list of ``key=value`` strings, applied last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from torch import nn

from medistill.assemble import assemble_run, execute_run
from medistill.errors import ConfigError

TeacherLike = str | Path | tuple[str, str | Path] | nn.Module


@dataclass
class Run:
    """A finished run: its directory, the first student's metrics (``val``, ``test``, cost), every
    student's, and — with ``baseline``/``compare`` — the paired comparison with the students alone."""

    out: Path
    metrics: dict[str, Any]
    students: dict[str, dict[str, Any]]
    comparison: dict[str, Any] | None = None


def _check_out(out: Any) -> str:
    if out is None or not str(out).strip():
        raise ConfigError(f"out={out!r}: give the run directory as a path, e.g. out='runs/kd'")
    if not isinstance(out, (str, Path)):
        raise ConfigError(f"out must be a path (str or Path), got {type(out).__name__}")
    return str(out)


def _overrides(data: Any, epochs: int | None, seed: int | None, out: Any, overrides: Sequence[str] | None,
               config: Any = None) -> list[Any]:
    if config is not None and not isinstance(config, (dict, str, Path)):
        raise ConfigError(f"config must be a dict of config keys or a YAML path, got {type(config).__name__}")
    if data is not None and not isinstance(data, (str, Path)):
        raise ConfigError(f"data must be a dataset name or path (str or Path), got {type(data).__name__}")
    for name, v in (("epochs", epochs), ("seed", seed)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ConfigError(f"{name} must be an int, got {v!r}")
    if isinstance(overrides, str):
        raise ConfigError("overrides must be a list of 'key=value' strings, not one string")
    flags = {"data.name": None if data is None else str(data), "train.epochs": epochs, "train.seed": seed,
             "out": _check_out(out)}
    return [(k, v) for k, v in flags.items() if v is not None] + list(overrides or [])


def _finish(cfg: Any, modules: dict[str, nn.Module], resume: bool, quiet: bool, baseline: bool | str = False,
            compare: str | Path | None = None, force: bool = False) -> Run:
    from medistill.eval.compare import read_comparison

    results = execute_run(cfg, resume=resume, console=Console(stderr=True, quiet=quiet), teacher_modules=modules,
                          baseline=baseline, compare=compare, force=force)
    first = cfg.students[0].name
    return Run(Path(cfg.out), results[first], results, read_comparison(cfg.out) if (baseline or compare) else None)


def _models(model: str | Sequence[str] | None) -> list[str] | None:
    if model is None:
        return None
    if isinstance(model, str):
        return [model]
    if not isinstance(model, (list, tuple)) or not model or not all(isinstance(m, str) for m in model):
        raise ConfigError(f"model must be a timm model name or a list of names, got {model!r}")
    return list(model)


def train(data: str | Path | None = None, model: str | Sequence[str] | None = None, *, epochs: int | None = None,
          seed: int | None = None, out: str | Path = "runs/run", config: dict[str, Any] | str | Path | None = None,
          overrides: Sequence[str] | None = None, resume: bool = False, quiet: bool = False, force: bool = False) -> Run:
    """Train a teacher or a student-only baseline (``train.loss`` picks the supervised loss).
    ``force`` writes into an ``out`` that holds other files or a finished run."""
    cfg = assemble_run("train", config, _overrides(data, epochs, seed, out, overrides, config), models=_models(model),
                       resume=resume)
    return _finish(cfg, {}, resume, quiet, force=force)


def distill(teachers: Sequence[TeacherLike], data: str | Path | None = None, model: str | Sequence[str] | None = None, *,
            method: str | None = "kd", terms: list[dict[str, Any]] | None = None, epochs: int | None = None,
            seed: int | None = None, out: str | Path = "runs/run", config: dict[str, Any] | str | Path | None = None,
            overrides: Sequence[str] | None = None, teacher_norm: str = "half", resume: bool = False,
            quiet: bool = False, baseline: bool | str = False, compare: str | Path | None = None, force: bool = False,
            unlabeled: str | Path | None = None, label_fraction: float | None = None) -> Run:
    """Distil ``teachers`` into the student(s) with a method preset or explicit loss ``terms``.
    Without ``data``, the data and split are those of the (first) teacher's run. ``baseline``
    also trains the students alone (``"selftrain"``: and the self-training control, the alone
    student distilled into a fresh one the same way); ``compare`` names such a run: ``Run.comparison`` then holds
    the paired differences. ``unlabeled``: images without labels the student learns the teacher's
    outputs on (``data.unlabeled``); ``label_fraction``: keep this share of the training labels."""
    if isinstance(teachers, (str, Path, tuple, nn.Module)):
        teachers = [teachers]   # one teacher given bare
    modules: dict[str, nn.Module] = {}
    entries: list[Any] = []
    for i, t in enumerate(teachers):
        name = "teacher" if len(teachers) == 1 else f"teacher{i}"
        if isinstance(t, nn.Module):
            modules[name] = t
            entries.append({"checkpoint": "<memory>", "norm": teacher_norm})
        elif isinstance(t, (str, Path, tuple)):
            entries.append(t if isinstance(t, tuple) else str(t))
        else:
            raise ConfigError(f"teachers[{i}]: expected a run/model directory, an (arch, weights_file) pair or an "
                              f"nn.Module, got {type(t).__name__}")
    if unlabeled is not None and not isinstance(unlabeled, (str, Path)):
        raise ConfigError(f"unlabeled=: expected the path of a folder of images, a CSV with a path column or an .npz "
                          f"with `images`, got {type(unlabeled).__name__} (save in-memory images to an .npz first)")
    extra = [(k, v) for k, v in (("data.unlabeled", None if unlabeled is None else str(unlabeled)),
                                 ("data.label_fraction", label_fraction)) if v is not None]
    cfg = assemble_run("distill", config, _overrides(data, epochs, seed, out, overrides, config) + extra, models=_models(model),
                       teachers=entries or None, method=None if terms is not None else method, terms=terms,
                       resume=resume)
    return _finish(cfg, modules, resume, quiet, baseline, compare, force)


def evaluate(target: str | Path, data: str | Path | None = None, *, split: str = "test",
             class_map: Sequence[str] | None = None, out: str | Path | None = None, latency: bool = False,
             device: str = "auto") -> dict[str, Any]:
    """Re-evaluate the students of a run (or one model directory) on the run's split, or on
    other ``data`` (external validation); returns metrics per model."""
    from medistill.commands.evaluate import evaluate_target

    return evaluate_target(target, data=None if data is None else str(data), out=out, latency=latency, split=split,
                           class_map=list(class_map or []) or None, device=device)


def predict(model: str | Path, images: Sequence[str | Path], *, cam: bool = False, out: str | Path | None = None,
            device: str = "cpu") -> list[dict[str, Any]]:
    """Class probabilities of image files from a run, model directory, weights file or ONNX file."""
    from medistill.commands.deploy import predict_files

    return list(predict_files(model, list(images), cam, out, device=device))


def explain(run: str | Path, *, images: int = 8, per_class: int | None = None,
            methods: Sequence[str] = ("gradcam", "scorecam", "avgmap"), split: str = "test", top_k: int | None = None,
            out: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Explanations of every model of a run (overlays, faithfulness, agreement, time)."""
    from medistill.explain.run import explain_run

    return explain_run(Path(run), images, per_class, list(methods), split, top_k, out=None if out is None else Path(out),
                       layers={}, compare={}, device=device)


def export(target: str | Path, *, format: str = "onnx", out: str | Path | None = None,
           force: bool = False) -> dict[str, Any]:
    """Export a student with its preprocessing (ONNX or TorchScript), checked against PyTorch;
    an existing file named by ``out`` is replaced only with ``force``."""
    from medistill.commands.deploy import export_model

    return export_model(target, format, out, force=force)


def load_student(directory: str | Path) -> nn.Module:
    """A saved student as one module: images ``[B, C, H, W]`` in [0, 1] → logits ``[B, K]``
    (the run's preprocessing included). See :func:`medistill.models.saved.load_student`."""
    from medistill.models.saved import load_student as _load

    return _load(directory)


def audit(data: str | Path, *, run: str | Path | None = None, oof: int | None = None, near_threshold: int = 4,
          class_names: Sequence[str] | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Audit a dataset (or a run's data and split): label conflicts, copies and near-duplicates
    across splits, class counts, image shapes; with ``run`` (or ``data`` being a run) the likely
    label errors its models find (``oof=K`` also scores the training images). Writes
    ``audit.json`` (and ``label_issues.csv``) and returns the report as a dict."""
    from medistill.commands.audit import audit_data

    if not 0 <= near_threshold <= 16:
        raise ConfigError(f"near_threshold={near_threshold}: use 0…16 bits of the 64-bit hash")
    if oof is not None and oof < 2:
        raise ConfigError(f"oof={oof}: out-of-fold predictions need K ≥ 2 folds")
    return audit_data(data, run, out, near_threshold, oof, list(class_names) if class_names else None)
