"""Finding things in run directories: the model directory behind a path a user gives."""

from __future__ import annotations

from pathlib import Path

from medistill.errors import ModelError
from medistill.models.ensemble import is_ensemble_dir


def resolve_teacher(path: str) -> Path:
    """A teacher checkpoint may be a model dir, a weights file beside model.json, or a run dir
    whose single student is the teacher."""
    p = Path(path)
    if is_ensemble_dir(p):
        return p
    if p.is_dir() and not (p / "model.json").is_file():
        students = sorted((p / "students").glob("*/model.json")) if (p / "students").is_dir() else []
        if len(students) == 1:
            return students[0].parent
        if students:
            raise ModelError(f"{p} holds {len(students)} students; name one: {', '.join(str(s.parent) for s in students)}")
        raise ModelError(f"teacher checkpoint {p}: no model.json and no students/ (not a medistill run or model dir)")
    if not p.exists():
        raise ModelError(f"teacher checkpoint not found: {p}")
    return p
