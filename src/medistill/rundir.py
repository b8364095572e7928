"""Run directories: the one place that knows their layout.

A run directory holds ``config.yaml``, ``split.json``, ``metrics.jsonl``, ``summary.json`` and one
model directory per student under ``students/NAME/`` (``model.json`` + ``model.safetensors``).
These helpers turn whatever path a user gives (run, model directory, weights file) into model
directories and the run they belong to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medistill.errors import ModelError
from medistill.models.ensemble import is_ensemble_dir


def resolve_teacher(path: str) -> Path:
    """A teacher checkpoint may be a model dir, a weights file beside model.json, or a run dir
    whose single student is the teacher."""
    p = Path(path)
    if is_ensemble_dir(p):
        return p
    if p.is_dir() and not (p / "model.json").is_file():
        students = student_dirs(p)
        if len(students) == 1:
            return students[0]
        if students:
            raise ModelError(f"{p} holds {len(students)} students; name one: {', '.join(str(s) for s in students)}")
        raise ModelError(f"teacher checkpoint {p}: no model.json and no students/ (not a medistill run or model dir)")
    if not p.exists():
        raise ModelError(f"teacher checkpoint not found: {p}")
    return p


STUDENTS = "students"


def student_dir(run: str | Path, name: str) -> Path:
    """``RUN/students/NAME``: where a run keeps one student's model, metrics and predictions."""
    return Path(run) / STUDENTS / name


def student_dirs(run: str | Path) -> list[Path]:
    """The model directories of a run's students, sorted by name (empty if none)."""
    d = Path(run) / STUDENTS
    return sorted(p.parent for p in d.glob("*/model.json")) if d.is_dir() else []


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.yaml").is_file() and (p / "split.json").is_file()


def run_dir_of(model_dir: str | Path) -> Path | None:
    """The run a model directory belongs to (itself, or two levels up), or None."""
    md = Path(model_dir)
    for cand in (md, md.parent.parent):
        if is_run_dir(cand):
            return cand
    return None


def resolve_model_dir(target: str | Path) -> Path:
    """A model directory, a weights file beside ``model.json``, or a run (its first student)."""
    t = Path(target)
    if (t / "model.json").is_file():
        return t
    if t.is_file() and (t.parent / "model.json").is_file():
        return t.parent
    students = student_dirs(t)
    if students:
        return students[0]
    raise ModelError(f"{t}: not a run directory, model directory or weights file beside model.json")


def write_run_files(out: Path, cfg: Any, teachers: list[Any], students: list[Any], terms: Any, device: Any,
                    data: Any) -> None:
    """A new run's ``config.yaml`` (every default written out), ``run_info.json`` (environment,
    seed, teachers' checkpoints and hashes, student adaptations, term parameters, device) and
    ``split.json`` (the exact images of each split)."""
    from medistill.config import dump_config
    from medistill.device import device_info
    from medistill.io import environment_info, write_json, write_text

    write_text(out / "config.yaml", dump_config(cfg))
    info = environment_info()
    info["seed"] = cfg.train.seed
    info["teachers"] = {t.name: {"checkpoint": t.checkpoint, "sha256": t.sha256} for t in teachers}
    info["adaptations"] = {s.name: s.spec.adaptation for s in students}
    # Training-only modules of the terms (projectors, regressors): dropped after training.
    info["term_parameters"] = {k.replace("__", "."): n for k, t in terms.items()
                               if (n := sum(p.numel() for p in t.parameters()))}
    from medistill import dist

    info.update(device_info(device), amp=cfg.train.amp, world_size=dist.world(), dist_backend=dist.backend())
    write_json(out / "run_info.json", info)
    write_json(out / "split.json", data.split_record())
