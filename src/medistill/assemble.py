"""One assembly of a run: what the command line, the Python API, sweeps, recipes and the demo
hand in (a config file or dict, ``key=value`` overrides, student models, teachers, a method)
becomes one validated :class:`RunConfig` here, and nowhere else.

The order is fixed: saved config (``--resume``) or config file → overrides → students from
``models`` → teachers → method terms → the overrides that address teachers/terms → the data of
the teacher's run when no data was named → checks. :func:`execute_run` then runs the engine and,
with ``baseline``/``compare``, answers "did it help?" against the same student trained alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from medistill.config import Override, RunConfig, apply_overrides, load_config, override_key, parse_override
from medistill.errors import ConfigError

# Keys of ``data`` a distillation run takes from its teacher's run when no data is named: which
# images, and how they are split. Training choices (augmentation, subsets, protocols, loaders)
# stay the student's own.
INHERITED_DATA = ("name", "format", "val_fraction", "test_fraction", "split_seed", "tiny_class_policy",
                  "max_eval_samples", "ordinal", "group_pattern", "group_by", "window", "dicom_frame",
                  "folds", "fold", "skip_corrupt", "label_fraction")
ALONE_DIR = "alone"
SELFTRAIN_DIR = "selftrain"


def student_entries(models: Sequence[str], input_size: int | None, base: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Students from model names: one is "student"; several are named by their model (``model_i``
    when a model repeats). ``base`` (the config's first student) gives the other settings."""
    if any(not m or not str(m).strip() for m in models):
        raise ConfigError("a student model name is empty (an unset shell variable?); give a timm model name or cnn5")
    models = list(models)
    names = ["student"] if len(models) == 1 else [m if models.count(m) == 1 else f"{m}_{i}" for i, m in enumerate(models)]
    keep = {k: v for k, v in (base or {}).items() if k not in ("name", "model", "kwargs")}
    return [{**keep, "name": n, "model": m, **({"input_size": input_size} if input_size else {})}
            for n, m in zip(names, models)]


def teacher_entry(teacher: Any, name: str) -> dict[str, Any]:
    """A teacher as a config entry: ``RUN_OR_MODEL_DIR``, ``ARCH=WEIGHTS`` (text), an
    ``(arch, weights)`` pair, or an entry dict."""
    if isinstance(teacher, dict):
        return {"name": name, **teacher}
    if isinstance(teacher, tuple):
        arch, path = teacher
        if not str(path).strip():
            raise ConfigError(f"teacher {arch!r}: the weights file is empty; give ARCH=PATH/TO/WEIGHTS")
        return {"name": name, "model": str(arch), "checkpoint": str(path)}
    text = str(teacher)
    if not text.strip():
        raise ConfigError("a teacher is empty (an unset shell variable?); give a run, model or ensemble "
                          "directory, or ARCH=WEIGHTS_FILE")
    if "=" in text and not Path(text).exists():
        arch, path = text.split("=", 1)
        if not path.strip() or not arch.strip():
            raise ConfigError(f"teacher {text!r}: expected ARCH=WEIGHTS_FILE with both parts, "
                              "e.g. resnet50=model_best.pth.tar")
        return {"name": name, "checkpoint": path, "model": arch}
    return {"name": name, "checkpoint": text}


def _check_not_empty(overrides: Sequence[Override]) -> None:
    for o in overrides:
        key, value = parse_override(o)
        if key in ("data.name", "out") and (value is None or str(value).strip() == ""):
            what = {"data.name": "the data (--data / data=)", "out": "the run directory (--out / out=)"}[key]
            raise ConfigError(f"{what} is empty (an unset shell variable?); name it, or leave it out for the default")


def _config_tree(config: dict[str, Any] | str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(validated tree with defaults, the keys the user wrote) of a config dict or YAML file."""
    import yaml

    if isinstance(config, (str, Path)):
        cfg = load_config(config)
        raw = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    else:
        raw = dict(config or {})
        cfg = load_config(None, [], base=raw)
    return cfg.model_dump(mode="json"), raw


def _starting_tree(config: dict[str, Any] | str | Path | None, overrides: Sequence[Override],
                   resume: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the flags apply to: on ``--resume`` without a config file, the run's saved config
    (paths resolved against it; its data counts as named); else the config file or dict."""
    out = next((str(parse_override(o)[1]) for o in overrides if override_key(o) == "out"), None)
    saved = Path(out) / "config.yaml" if out else None
    if resume and config is None and saved is not None and saved.is_file():
        from medistill.rundir import load_run_config

        return load_run_config(saved.parent).model_dump(mode="json"), {"data": {"name": True}}
    if resume and out is None and config is None:
        raise ConfigError("--resume needs the run directory (--out RUN_DIR)")
    return _config_tree(config)


def _inherit_data(tree: dict[str, Any], explicit: set[str], console: Any) -> None:
    """No data named: take the first teacher's (run, model inside a run, or ensemble of runs)."""
    from medistill.rundir import load_run_config, teacher_run

    t = next((t for t in tree["teachers"] if t.get("checkpoint") not in (None, "<memory>")), None)
    run = teacher_run(t["checkpoint"]) if t and Path(t["checkpoint"]).exists() else None
    if run is None:
        return
    data = load_run_config(run).data.model_dump(mode="json")
    for k in INHERITED_DATA:
        if k not in explicit:
            tree["data"][k] = data[k]
    if console is not None:
        console.print(f"data: {tree['data']['name']} with the split of teacher {t['name']!r} ({run})")


def assemble_run(kind: str, config: dict[str, Any] | str | Path | None = None, overrides: Sequence[Override] = (), *,
                 models: Sequence[str] | None = None, input_size: int | None = None,
                 teachers: Sequence[Any] | None = None, method: str | None = None,
                 terms: list[dict[str, Any]] | None = None, pretrained: bool = False, resume: bool = False,
                 console: Any = None) -> RunConfig:
    """The run's configuration; ``kind`` is "train" (no teachers), "distill", or "auto" (either,
    by whether the result has teachers: sweeps and recipes)."""
    from medistill.presets import method_settings, method_terms

    if kind not in ("train", "distill", "auto"):
        raise ConfigError(f"unknown run kind {kind!r}")
    overrides = list(overrides)
    _check_not_empty(overrides)
    if input_size is not None and not 8 <= input_size <= 4096:
        raise ConfigError(f"--input-size (input_size) {input_size} is out of range: give 8 to 4096 px, or leave it "
                          "out for the data's size")
    tree, raw = _starting_tree(config, overrides, resume)
    # The overrides that address students/teachers/terms wait until those lists are built from the flags.
    later = tuple(p for p, flag in (("students.", models), ("teachers.", teachers), ("terms.", method or terms)) if flag)
    deferred = [o for o in overrides if later and override_key(o).startswith(later)]
    apply_overrides(tree, [o for o in overrides if o not in deferred])
    for part in ("students", "teachers", "terms"):
        if part in tree and tree[part] is not None and not (
                isinstance(tree[part], list) and all(isinstance(e, dict) for e in tree[part])):
            raise ConfigError(f"{part} must be a list of mappings (e.g. [{{name: a, model: resnet18}}]); got {tree[part]!r:.80}")
    if models:
        tree["students"] = student_entries(models, input_size, tree["students"][0] if tree.get("students") else None)
    elif input_size:
        tree["students"] = [{**s, "input_size": input_size} for s in tree["students"]]
    if pretrained:
        for s in tree["students"]:
            s["pretrained"] = True
    if teachers:
        tree["teachers"] = [teacher_entry(t, f"teacher{i}" if len(teachers) > 1 else "teacher")
                            for i, t in enumerate(teachers)]
    if terms is not None:
        tree["terms"] = terms
    elif method:
        tree["terms"] = method_terms(method, tree["train"]["epochs"])
        given = {override_key(o) for o in overrides}
        settings = {k: v for k, v in method_settings(method).items() if k not in given}
        apply_overrides(tree, [(k, v) for k, v in settings.items()])
        if settings and console is not None:
            console.print(f"method {method}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    apply_overrides(tree, deferred)
    if kind == "auto":
        kind = "distill" if tree.get("teachers") else "train"
    explicit = {k for k in (raw.get("data") or {})} | {override_key(o)[5:] for o in overrides
                                                       if override_key(o).startswith("data.")}
    if kind == "distill" and tree.get("teachers") and "name" not in explicit:
        _inherit_data(tree, explicit, console)
    if kind == "train" and tree.get("teachers"):
        raise ConfigError("`train` takes no teachers; use `medistill distill`")
    if kind == "distill" and not tree.get("teachers") and not any(t.get("type") == "peer" for t in tree.get("terms", [])):
        raise ConfigError("`distill` needs a teacher (--teacher, teachers=, or teachers: in the config), "
                          "or peer terms for mutual learning")
    if kind == "distill" and not tree.get("terms"):
        raise ConfigError("`distill` needs a method (--method / method=) or loss terms (terms:)")
    return load_config(None, [], base=tree)


def _teachers_side(cfg: RunConfig) -> int | None:
    """The largest input side of the run's teachers as their model.json files record it (what
    a distilled student without ``input_size`` follows); None where a teacher records none."""
    from medistill.errors import MedistillError
    from medistill.rundir import resolve

    sides = []
    for t in cfg.teachers:
        try:
            metas = [m / "model.json" for m in resolve(t.checkpoint).models] if not t.input_size else []
            sides += [t.input_size] if t.input_size else [json.loads(m.read_text())["input_size"] for m in metas]
        except (MedistillError, OSError, KeyError, ValueError):
            return None
        if not t.input_size and not metas:
            return None
    return max(sides) if sides else None


def baseline_config(cfg: RunConfig, out: str | Path | None = None) -> RunConfig:
    """The same students trained alone: same data, split, schedule, optimiser and seed; no
    teachers and no distillation terms (the supervised loss ``train.loss``)."""
    tree = cfg.model_dump(mode="json")
    tree.update(teachers=[], terms=[], out=str(out or Path(cfg.out) / ALONE_DIR))
    side = _teachers_side(cfg)
    for s in tree["students"]:   # the size the distilled student took from its teachers, not the images' own
        meta = Path(cfg.out) / "students" / s["name"] / "model.json"
        if s.get("input_size") is None:
            s["input_size"] = json.loads(meta.read_text())["input_size"] if meta.is_file() else side
    tree["data"]["role"] = "student" if cfg.data.role == "auto" else cfg.data.role   # the same protocol side
    return RunConfig.model_validate(tree)


BASELINE_ARMS = ("alone", "selftrain")


def baseline_arm(argv: list[str]) -> list[str]:
    """``distill --baseline`` alone (last, or before another option) means the alone arm;
    ``--baseline selftrain`` names the other. click's optional-value options are not exposed by
    typer, so the bare flag gets its value here; a wrong value is refused by the command."""
    if len(argv) < 2 or argv[1] != "distill":
        return argv
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--baseline" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("alone")
    return out


def selftrain_config(cfg: RunConfig, alone: Path, out: Path) -> RunConfig:
    """The self-training control: the run's own method and unlabelled images, with the student
    trained alone (``alone``) as the only teacher of a fresh student of the same architecture."""
    if len(cfg.students) != 1:
        raise ConfigError(f"--baseline selftrain takes one student (this run has {len(cfg.students)}): each would need "
                          "its own alone teacher")
    tree = cfg.model_dump(mode="json")
    tree.update(teachers=[{"name": "self", "checkpoint": str(alone)}], out=str(out))
    return RunConfig.model_validate(tree)


def execute_run(cfg: RunConfig, *, resume: bool = False, download: bool = False, console: Any = None,
                teacher_modules: dict[str, Any] | None = None, baseline: bool | str | None = False,
                compare: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """Run the engine; with ``baseline`` also train the students alone (``OUT/alone``, resumed or
    reused when already there), or with ``compare`` take an existing run of them alone; then
    write the paired comparison (``comparison.json``, the verdict atop ``summary.md``).
    ``baseline="selftrain"`` adds the self-training control (:func:`selftrain_config`, in
    ``OUT/selftrain``) and its paired comparison (``comparison_selftrain.json``)."""
    from medistill.distill.engine import Engine

    if baseline == "selftrain" and not cfg.teachers:
        raise ConfigError("--baseline selftrain needs a teacher run: it compares the teacher with the student's own "
                          "pseudo-labels")
    if baseline and compare:
        raise ConfigError("give either a baseline to train (--baseline) or a run to compare with (--compare), not both")
    if compare is not None and not (Path(compare) / "split.json").is_file():
        raise ConfigError(f"--compare {compare}: not a run directory (no split.json)")
    results = Engine(cfg, resume=resume, download=download, console=console, teacher_modules=teacher_modules,
                     force=force).run()
    alone = Path(compare) if compare is not None else None
    if baseline:
        alone = Path(cfg.out) / ALONE_DIR
        if not (alone / "summary.json").is_file():
            if console is not None:
                console.print(f"[bold]baseline[/]: the same student(s) trained alone → {alone}")
            Engine(baseline_config(cfg, alone), resume=(alone / "checkpoint_last.pt").is_file(), download=download,
                   console=console).run()
    selftrain = Path(cfg.out) / SELFTRAIN_DIR if baseline == "selftrain" else None
    if selftrain is not None and not (selftrain / "summary.json").is_file():
        if console is not None:
            console.print(f"[bold]baseline[/]: the alone student as its own teacher (same method, same unlabelled "
                          f"images) → {selftrain}")
        Engine(selftrain_config(cfg, alone, selftrain), resume=(selftrain / "checkpoint_last.pt").is_file(),
               download=download, console=console).run()
    if alone is not None:
        from medistill import dist
        from medistill.eval.compare import write_comparison

        if dist.rank() == 0:
            # the verdict always gets an interval, even where eval.bootstrap=0 switched the per-run ones off
            n = max(cfg.eval.bootstrap, 200)
            if selftrain is not None:
                write_comparison(Path(cfg.out), selftrain, n, cfg.eval.bootstrap_seed, control="selftrain")
            write_comparison(Path(cfg.out), alone, n, cfg.eval.bootstrap_seed)
    return results
