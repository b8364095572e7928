"""``medistill evaluate``: re-evaluate saved students on their run's exact splits."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from medistill.config import EvalConfig, TrainConfig, load_config
from medistill.data import build_data
from medistill.data.dataset import DataBundle
from medistill.data.sources import open_source
from medistill.device import resolve_device
from medistill.errors import ConfigError, DataError, ModelError
from medistill.eval.predict import evaluate_splits
from medistill.io import write_json
from medistill.models.cost import model_cost
from medistill.models.factory import data_size, load_model_dir
from medistill.progress import steps
from medistill.rundir import load_run_config, read_run_json, resolve, run_dir_of

# evaluation batches are bounded in bytes as in training (train.eval_batch_mb's default)
EVAL_BATCH_MB = TrainConfig.model_fields["eval_batch_mb"].default


def external_bundle(data: str, class_names: list[str], class_map: list[str] | None = None) -> DataBundle:
    """Every image of another dataset as one split ``all``, its labels mapped onto the model's
    classes by name (``class_map``: ``DATA_CLASS=MODEL_CLASS`` for names that differ). A class
    the model does not know is an error naming it: its images could not be scored."""
    source = open_source(data)
    mapping = {}
    for item in class_map or []:
        if "=" not in item:
            raise ConfigError(f"--class-map {item!r} must look like DATA_CLASS=MODEL_CLASS")
        a, b = item.split("=", 1)
        mapping[a] = b
    bad = [m for m in mapping.values() if m not in class_names]
    if bad:
        raise ConfigError(f"--class-map names {bad}, which the model does not predict; its classes are {class_names}")
    index = {c: i for i, c in enumerate(class_names)}
    lut, unknown = [], []
    for c in source.class_names:
        name = mapping.get(c, c)
        if name not in index:
            unknown.append(c)
        lut.append(index.get(name, -1))
    if unknown:
        raise DataError(f"{data} has classes {unknown} that the model does not know (its classes: {class_names}); "
                        "map them with --class-map DATA_CLASS=MODEL_CLASS")
    labels = np.asarray(lut, dtype=np.int64)[source.labels]
    source = dataclasses.replace(source, labels=labels, class_names=list(class_names), split_tags=None)
    cfg = load_config(None, [("data.name", data)]).data
    return DataBundle(cfg, source, {"all": np.arange(len(labels))}, f"every image of {data}", source.default_size)


def evaluate_target(target: str | Path, data: str | None = None, out: str | Path | None = None,
                    latency: bool = True, split: str = "test", class_map: list[str] | None = None,
                    device: str = "auto") -> dict[str, Any]:
    """Evaluate every student of a run dir, or one model dir / weights file.

    The data and split come from the run (``config.yaml`` + ``split.json``) unless ``data`` names
    another dataset: external validation. With ``split="all"`` every image of it is scored once
    (classes matched by name, see :func:`external_bundle`); otherwise it is split with the
    default settings and its test part scored. External results go to
    ``MODEL/external/NAME/`` (or ``out``), never over the run's own metrics."""
    if split not in ("test", "all"):
        raise ConfigError(f"--split must be test or all, got {split!r}")
    if split == "all" and data is None:
        raise ConfigError("--split all scores every image of another dataset: pass it with --data")
    t = resolve(target)
    if t.kind == "ensemble" and data is None and out is None:
        return {"ensemble": evaluate_ensemble(t.path, latency=latency)}
    if t.kind in ("onnx", "ensemble") or (t.kind == "weights" and not t.models):
        raise ModelError(f"{t.path}: evaluate takes a run, a model directory or a weights file beside model.json "
                         f"(this is {'an' if t.kind[0] in 'aeo' else 'a'} {t.kind})")
    # a weights file named on the command line is the one evaluated, not its folder's model.safetensors
    model_dirs = [t.path] if t.kind == "weights" else list(t.models)
    run_dir = t.run
    if not model_dirs:
        raise ModelError(f"{t.path}: no students to evaluate")
    ev = load_run_config(run_dir).eval if run_dir is not None else EvalConfig()
    dev = resolve_device(device)
    bundle = None
    if data is None and run_dir is not None:
        cfg = load_run_config(run_dir)
        saved = read_run_json(run_dir / "split.json")
        bundle = build_data(cfg.data, fixed_splits=saved, open_pool=False)
    elif data is None:
        p = Path(target)
        gone = [f for f in ("config.yaml", "split.json") if (p / "summary.json").is_file() and not (p / f).is_file()]
        if gone:
            raise ModelError(f"{p / gone[0]} is missing: evaluating a run on its own images needs its config.yaml and "
                             "split.json; restore it, or pass --data to evaluate on other data")
        raise ModelError(f"{target} is not inside a run directory; pass --data")
    elif split == "test":
        bundle = build_data(load_config(None, [("data.name", data)]).data)
    if data is not None and run_dir is not None:
        _refuse_own_data(run_dir, bundle.source if bundle is not None else open_source(str(data)))
    results = {}
    external: dict[tuple[str, ...], DataBundle] = {}   # one opened dataset per class list, not per student
    with steps(None, f"evaluate {len(model_dirs)} model(s)", len(model_dirs)) as advance:
        for d in model_dirs:
            results[d.name] = _evaluate_dir(d, bundle, external, data, class_map, split, out, len(model_dirs), ev, dev,
                                            latency)
            advance(d.name)
    if run_dir is not None and out is None and data is None and t.kind == "run":
        first = model_dirs[0].name
        write_json(run_dir / "metrics.json", {**results[first], "student": first})
    return results


def _classes_by_name(bundle: DataBundle, model_classes: list[str], data: str) -> DataBundle:
    """Another dataset's test split scored by a model: its labels follow the model's class order
    by name (the same names in another order are re-indexed); other names are refused, naming
    both lists — scored by position, they would compare the wrong classes."""
    have = list(bundle.class_names)
    if have == list(model_classes):
        return bundle
    if sorted(have) != sorted(model_classes):
        raise ConfigError(f"{data} names its classes {have} but the model predicts {list(model_classes)}: its labels "
                          "cannot be matched to the model's classes; score every image with --split all and "
                          "--class-map DATA_CLASS=MODEL_CLASS")
    lut = np.array([list(model_classes).index(c) for c in have], dtype=np.int64)
    source = dataclasses.replace(bundle.source, labels=lut[bundle.source.labels], class_names=list(model_classes))
    return dataclasses.replace(bundle, source=source)


def _refuse_own_data(run_dir: Path, source: Any) -> None:
    """External validation on the data the run was trained on would score its training images."""
    try:
        own = json.loads((run_dir / "split.json").read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        return
    if own and source.fingerprint == own:
        raise ConfigError(f"--data {source.description} is the data {run_dir} was trained on (same fingerprint "
                          f"{own[:12]}…): external validation needs other images. For the run's own test split, "
                          f"leave out --data")


def _evaluate_dir(d: Path, bundle: DataBundle | None, external: dict[tuple[str, ...], DataBundle], data: str | None,
                  class_map: list[str] | None, split: str, out: str | Path | None, n_models: int, ev: EvalConfig,
                  dev: Any, latency: bool) -> dict[str, Any]:
    """One model directory: its data (external data opened once per class list) and destination."""
    model, pre, spec = load_model_dir(d)
    if split == "all":
        key = tuple(spec.class_names)
        if key not in external:
            external[key] = external_bundle(str(data), spec.class_names, class_map)
        bundle = external[key]
    assert bundle is not None
    if data is not None and split == "test" and spec.num_classes == bundle.num_classes:
        bundle = _classes_by_name(bundle, spec.class_names, data)
    home = d if d.is_dir() else d.parent
    if out is not None:
        dest = Path(out) / d.name if n_models > 1 else Path(out)
    elif data is not None:
        # named by the data's content, not its folder's last name alone: siteA/images and
        # siteB/images must not share a results folder
        fp = (bundle.source.fingerprint or "")[:8]
        dest = home / "external" / (_slug(data) + (f"-{fp}" if fp else "") + ("" if split == "all" else "-test"))
    else:
        dest = home
    return _evaluate_one(d, model, pre, spec, bundle, dest, split, data, ev, dev, latency)


def _evaluate_one(d: Path, model: Any, pre: Any, spec: Any, bundle: DataBundle, dest: Path, split: str,
                  data: str | None, ev: EvalConfig, dev: Any, latency: bool) -> dict[str, Any]:
    """One model on ``bundle`` (val and test, or ``all``): metrics, cost, predictions → ``dest``."""
    if spec.num_classes != bundle.num_classes:
        raise ModelError(f"{d} predicts {spec.num_classes} classes; the data has {bundle.num_classes}")
    bundle = dataclasses.replace(bundle, image_size=data_size(bundle.source.native_size, [spec], not bundle.source.in_memory))
    parts = ("all",) if split == "all" else ("val", "test")
    loaders = {k: bundle.loader(k, bundle.eval_batch(256, EVAL_BATCH_MB), train=False) for k in parts}
    info = model_cost(model, spec, latency=latency)   # CPU cost, before the move
    model.to(dev)
    pre.to(dev)
    res = evaluate_splits(model, pre, loaders, dest, info.pop("model"), spec.class_names, ordinal=bundle.ordinal,
                          bootstrap=ev.bootstrap, bootstrap_seed=ev.bootstrap_seed, threshold=spec.threshold,
                          predictions_split=parts[-1])
    res.update(info)
    if data is not None:
        res["data"] = {"name": str(data), "split": split, "images": int(sum(len(bundle.splits[k]) for k in parts))}
    write_json(dest / "metrics.json", res)
    return res


def evaluate_ensemble(directory: str | Path, latency: bool = False) -> dict[str, Any]:
    """Evaluate an ensemble directory on its members' (shared) validation and test splits.

    Writes ``metrics.json`` (the averaged prediction, with ``members`` beside it),
    ``predictions_test.csv``, ``confusion_test.png`` and ``summary.md`` into the directory.
    Members trained on different splits are refused: the ensemble's test set would hold images
    some member trained on."""
    import statistics

    from medistill.io import write_text
    from medistill.rundir import load_ensemble

    d = Path(directory)
    ens, specs, digest, rec = load_ensemble(d)
    runs = []
    for row in rec["members"]:
        md = d / row["model_dir"]
        run = run_dir_of(md)
        if run is None:
            raise ModelError(f"ensemble member {md} is not inside a run directory (no config.yaml/split.json): "
                             "its split is unknown, so it cannot be evaluated without a leak check")
        runs.append(run)
    split = read_run_json(runs[0] / "split.json")
    for run in runs[1:]:
        other = read_run_json(run / "split.json")
        if other.get("val") != split.get("val") or other.get("test") != split.get("test"):
            raise ModelError(f"ensemble members {runs[0]} and {run} were trained on different splits; "
                             "an ensemble of them has no clean test set")
    cfg = load_run_config(runs[0])
    bundle = build_data(cfg.data, fixed_splits=split, open_pool=False)
    bundle = dataclasses.replace(bundle, image_size=data_size(bundle.source.native_size, specs, not bundle.source.in_memory))
    loaders = {k: bundle.loader(k, bundle.eval_batch(256, EVAL_BATCH_MB), train=False) for k in ("val", "test")}
    c = bundle.channels
    from medistill.models.factory import Preprocess

    pre = Preprocess(c, c, bundle.image_size, (0.0,) * c, (1.0,) * c)
    from medistill.models.cost import count_flops, count_params

    info = {"params": count_params(ens), "arch": f"ensemble of {len(specs)}",
            "flops": sum(count_flops(m, (1, s.in_chans, s.input_size, s.input_size)) for m, s in zip(ens.members, specs))}
    res = evaluate_splits(ens, pre, loaders, d, info, rec["class_names"], ordinal=bundle.ordinal)
    members = {}
    for row, run in zip(rec["members"], runs):
        m = json.loads(((d / row["model_dir"]) / "metrics.json").read_text())
        members[row["model_dir"]] = {"val": m["val"], "test": m["test"], "run": str(run)}
    res["members"] = members
    res["ensemble"] = {"aggregation": rec["aggregation"], "sha256": digest}
    write_json(d / "metrics.json", res)
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in members.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m["test"][k]) for k in keys) + " |")
    vals = {k: [m["test"][k] for m in members.values() if m["test"][k] is not None] for k in keys}
    lines.append("| members, mean ± std | " + " | ".join(
        f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}" if v else "–" for v in vals.values()) + " |")
    lines.append(f"| **ensemble ({rec['aggregation']})** | " + " | ".join(_fmt(res["test"][k]) for k in keys) + " |")
    write_text(d / "summary.md", "Test split, members and their ensemble:\n\n" + "\n".join(lines) + "\n")
    return res


def _slug(data: str) -> str:
    name = Path(data).name
    for suffix in (".npz", ".csv"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "data"


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"
