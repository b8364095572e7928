"""``medistill evaluate``: re-evaluate saved students on their run's exact splits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medistill.config import load_config
from medistill.data import build_data
from medistill.distill.engine import model_cost
from medistill.errors import ModelError
from medistill.eval.predict import evaluate_splits
from medistill.io import write_json
from medistill.models.factory import load_model_dir


def _run_dir_of(model_dir: Path) -> Path | None:
    for cand in (model_dir, model_dir.parent.parent):
        if (cand / "config.yaml").is_file() and (cand / "split.json").is_file():
            return cand
    return None


def evaluate_target(target: str | Path, data: str | None = None, out: str | Path | None = None,
                    latency: bool = True) -> dict[str, Any]:
    """Evaluate every student of a run dir, or one model dir / weights file.

    The data and split come from the run (``config.yaml`` + ``split.json``) unless ``data`` names
    another dataset, which is then split with the default settings."""
    target = Path(target)
    if not target.exists():
        raise ModelError(f"nothing to evaluate at {target}")
    if (target / "students").is_dir():
        model_dirs = sorted(p.parent for p in (target / "students").glob("*/model.json"))
        run_dir: Path | None = target
    else:
        model_dirs = [target]
        run_dir = _run_dir_of(target if target.is_dir() else target.parent)
    if not model_dirs:
        raise ModelError(f"{target}: no students to evaluate")
    if data is None and run_dir is not None:
        cfg = load_config(run_dir / "config.yaml")
        split = json.loads((run_dir / "split.json").read_text())
        bundle = build_data(cfg.data, fixed_splits=split)
    else:
        if data is None:
            raise ModelError(f"{target} is not inside a run directory; pass --data")
        bundle = build_data(load_config(None, [f"data.name={data}"]).data)
    results = {}
    for d in model_dirs:
        model, pre, spec = load_model_dir(d)
        if spec.num_classes != bundle.num_classes:
            raise ModelError(f"{d} predicts {spec.num_classes} classes; the data has {bundle.num_classes}")
        bundle.image_size = bundle.source.native_size or spec.input_size
        loaders = {k: bundle.loader(k, 256, train=False) for k in ("val", "test")}
        dest = Path(out) / d.name if out is not None and len(model_dirs) > 1 else (Path(out) if out is not None else d if d.is_dir() else d.parent)
        info = model_cost(model, spec, latency=latency)
        res = evaluate_splits(model, pre, loaders, dest, info.pop("model"), spec.class_names)
        res.update(info)
        write_json(dest / "metrics.json", res)
        results[d.name] = res
    if run_dir is not None and out is None and (target / "students").is_dir():
        first = model_dirs[0].name
        write_json(run_dir / "metrics.json", {**results[first], "student": first})
    return results
