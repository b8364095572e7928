"""The Python API: train and distil from a notebook, without the command line.

    from medistill.api import distill, train

    run = train(data="isic9_64.npz", model="resnet18", epochs=10, out="runs/t18")
    kd = distill(teachers=[run.out], data="isic9_64.npz", model="mobilenetv3_small_100",
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

from medistill.config import apply_overrides, load_config
from medistill.distill.engine import Engine
from medistill.distill.methods import method_terms
from medistill.errors import ConfigError

TeacherLike = str | Path | tuple[str, str | Path] | nn.Module


@dataclass
class Run:
    """A finished run: its directory and the first student's metrics (``val``, ``test``, cost)."""

    out: Path
    metrics: dict[str, Any]
    students: dict[str, dict[str, Any]]


def _tree(config: dict[str, Any] | str | Path | None, data: str | None, model: str | Sequence[str] | None,
          epochs: int | None, seed: int | None, out: str | Path) -> dict[str, Any]:
    if isinstance(config, (str, Path)):
        tree = load_config(config).model_dump(mode="json")
    else:
        tree = load_config(None, [], base=dict(config or {})).model_dump(mode="json")
    if data is not None:
        tree["data"]["name"] = str(data)
    if model is not None:
        models = [model] if isinstance(model, str) else list(model)
        base = tree["students"][0] if tree["students"] else {}
        tree["students"] = [{**base, "name": "student" if len(models) == 1 else f"{m}_{i}", "model": m}
                            for i, m in enumerate(models)]
    if epochs is not None:
        tree["train"]["epochs"] = epochs
    if seed is not None:
        tree["train"]["seed"] = seed
    tree["out"] = str(out)
    return tree


def _finish(tree: dict[str, Any], overrides: Sequence[str] | None, modules: dict[str, nn.Module],
            resume: bool, quiet: bool) -> Run:
    apply_overrides(tree, list(overrides or []))
    cfg = load_config(None, [], base=tree)
    results = Engine(cfg, resume=resume, console=Console(stderr=True, quiet=quiet), teacher_modules=modules).run()
    first = cfg.students[0].name
    return Run(Path(cfg.out), results[first], results)


def train(data: str | None = None, model: str | Sequence[str] | None = None, *, epochs: int | None = None,
          seed: int | None = None, out: str | Path = "runs/run", config: dict[str, Any] | str | Path | None = None,
          overrides: Sequence[str] | None = None, resume: bool = False, quiet: bool = False) -> Run:
    """Train a teacher or a student-only baseline (``train.loss`` picks the supervised loss)."""
    return _finish(_tree(config, data, model, epochs, seed, out), overrides, {}, resume, quiet)


def distill(teachers: Sequence[TeacherLike], data: str | None = None, model: str | Sequence[str] | None = None, *,
            method: str | None = "kd", terms: list[dict[str, Any]] | None = None, epochs: int | None = None,
            seed: int | None = None, out: str | Path = "runs/run", config: dict[str, Any] | str | Path | None = None,
            overrides: Sequence[str] | None = None, teacher_norm: str = "half", resume: bool = False,
            quiet: bool = False) -> Run:
    """Distil ``teachers`` into the student(s) with a method preset or explicit loss ``terms``."""
    tree = _tree(config, data, model, epochs, seed, out)
    modules: dict[str, nn.Module] = {}
    entries = []
    for i, t in enumerate(teachers):
        name = "teacher" if len(teachers) == 1 else f"teacher{i}"
        if isinstance(t, nn.Module):
            modules[name] = t
            entries.append({"name": name, "checkpoint": "<memory>", "norm": teacher_norm})
        elif isinstance(t, tuple):
            entries.append({"name": name, "model": t[0], "checkpoint": str(t[1])})
        else:
            entries.append({"name": name, "checkpoint": str(t)})
    if entries:
        tree["teachers"] = entries
    if terms is not None:
        tree["terms"] = terms
    elif method is not None:
        tree["terms"] = method_terms(method, tree["train"]["epochs"])
    if not tree.get("terms"):
        raise ConfigError("distill needs a method or loss terms")
    return _finish(tree, overrides, modules, resume, quiet)
