"""Run directories: the one place that knows their layout.

A run directory holds ``config.yaml``, ``split.json``, ``metrics.jsonl``, ``summary.json`` and one
model directory per student under ``students/NAME/`` (``model.json`` + ``model.safetensors``).
These helpers turn whatever path a user gives (run, model directory, weights file) into model
directories and the run they belong to."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medistill.classes import same_classes
from medistill.errors import ModelError
from medistill.io import sha256_file, write_json

# --- ensemble directories: ensemble.json (members' model dirs relative to it, their weights'
# sha256, aggregation, class names) beside the members, usually seed-N/ runs of `train --seeds`.
ENSEMBLE_FILE = "ensemble.json"

if TYPE_CHECKING:
    from medistill.models.ensemble import EnsembleModel
    from medistill.models.factory import ModelSpecRecord


def read_run_json(path: str | Path) -> Any:
    """A run's JSON file (``split.json``, ``summary.json``, ``metrics.json``, …); missing or damaged
    is a :class:`ConfigError` naming the file, not a traceback."""
    from medistill.errors import ConfigError

    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p} is missing: the run is incomplete (interrupted before it finished, or a file "
                          "was deleted)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p} is unreadable ({type(e).__name__}: {e}); the run's files are damaged") from None


def read_run_jsonl(path: str | Path) -> list[Any]:
    """``metrics.jsonl``: one JSON object per line; a damaged line is a :class:`ConfigError` naming it."""
    from medistill.errors import ConfigError

    out = []
    for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{n}: not a JSON line; the run's log is damaged") from None
    return out


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


@dataclass(frozen=True)
class Target:
    """What a path handed to medistill is (:func:`resolve`). ``kind``: run, model (a model
    directory), weights (a file: beside a model.json, or from elsewhere), ensemble or onnx;
    ``run``: the run it belongs to, if any; ``models``: the model directories it stands for (a
    run's students, the model itself, an ensemble's members)."""

    kind: str
    path: Path
    run: Path | None
    models: tuple[Path, ...]


def resolve(path: str | Path) -> Target:
    """The one reading of a path every command uses: a run, a model directory, a weights file,
    an ensemble directory or an exported ONNX file. Nothing there is a :class:`ModelError`."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"nothing at {p}: expected a run, model or ensemble directory, a weights file or an .onnx file")
    if p.is_file() and p.suffix == ".onnx":
        return Target("onnx", p, None, ())
    if is_ensemble_dir(p):
        rows = read_ensemble(p)["members"]
        return Target("ensemble", p, None, tuple(p / r["model_dir"] if not Path(r["model_dir"]).is_absolute()
                                                 else Path(r["model_dir"]) for r in rows))
    if p.is_file() and p.suffix.lower() in (".npz", ".csv", ".yaml", ".yml", ".png", ".jpg", ".jpeg"):
        raise ModelError(f"{p} is a {p.suffix.lower()[1:]} file, not a model: expected a run, model or ensemble "
                         "directory, a weights file (ARCH=FILE for a teacher from elsewhere) or an .onnx file")
    if p.is_file():
        beside = (p.parent / "model.json").is_file()
        return Target("weights", p, run_dir_of(p.parent) if beside else None, (p.parent,) if beside else ())
    if (p / "model.json").is_file():
        return Target("model", p, run_dir_of(p), (p,))
    students = student_dirs(p)
    if students or is_run_dir(p):
        return Target("run", p, p if is_run_dir(p) else None, tuple(students))
    raise ModelError(f"{p}: not a run, model or ensemble directory (no model.json, students/ or ensemble.json)")


def resolve_teacher(path: str) -> Path:
    """A teacher: an ensemble directory, a model directory or weights file, or a run whose single
    student is the teacher."""
    if not Path(path).exists():
        raise ModelError(f"teacher checkpoint not found: {path}")
    t = resolve(path)
    if t.kind == "run":
        if len(t.models) == 1:
            return t.models[0]
        if t.models:
            raise ModelError(f"{t.path} holds {len(t.models)} students; name one: {', '.join(str(s) for s in t.models)}")
        raise ModelError(f"teacher checkpoint {t.path}: a run without students (not finished?)")
    return t.path


def resolve_model_dir(target: str | Path) -> Path:
    """A model directory, a weights file beside ``model.json``, or a run (its first student)."""
    t = resolve(target)
    if t.kind in ("model", "weights", "run") and t.models:
        return t.models[0]
    raise ModelError(f"{t.path}: not a run directory, model directory or weights file beside model.json")


def portable_path(path: str, run: str | Path) -> str:
    """How a run stores a path it depends on (a teacher, the data): relative to the run directory
    when it lies inside it, else absolute, so that the run works from any working directory and
    a copied run keeps what it carries. A name that is not an existing path (a MedMNIST name, a
    file found in ``MEDISTILL_DATA_DIR``, ``<memory>``) is kept as it is."""
    p = Path(path).expanduser()
    if not path or not p.exists():
        return path
    p, r = p.resolve(), Path(run).resolve()
    try:
        return p.relative_to(r).as_posix() or "."
    except ValueError:
        return str(p)


def resolve_in_run(path: str, run: str | Path) -> str:
    """The inverse of :func:`portable_path`: a relative path inside ``run`` if it exists there;
    otherwise the path as stored (runs written before 2026-12 stored paths relative to the
    working directory they were made in, and names such as ``retinamnist`` are not paths)."""
    if not path or Path(path).is_absolute():
        return path
    cand = Path(run) / path
    return str(cand) if cand.exists() else path


def _path_fields(tree: dict[str, Any], convert: Any) -> dict[str, Any]:
    """``data.name``, ``teachers.N.checkpoint`` and local ``students.N.pretrained`` files through ``convert``."""
    tree = dict(tree, data=dict(tree["data"]))
    tree["data"]["name"] = convert(tree["data"]["name"])
    if tree["data"].get("unlabeled"):
        tree["data"]["unlabeled"] = convert(tree["data"]["unlabeled"])
    tree["teachers"] = [dict(t, checkpoint=convert(t["checkpoint"])) for t in tree.get("teachers", [])]
    tree["students"] = [dict(s, pretrained=convert(s["pretrained"]) if isinstance(s.get("pretrained"), str) else s.get("pretrained"))
                        for s in tree.get("students", [])]
    return tree


def portable_config(cfg: Any, run: str | Path) -> Any:
    """``cfg`` with its paths stored as :func:`portable_path` does (what ``config.yaml`` holds)."""
    from medistill.config import RunConfig

    return RunConfig.model_validate(_path_fields(cfg.model_dump(mode="json"), lambda v: portable_path(v, run)))


def load_run_config(run: str | Path) -> Any:
    """A run's ``config.yaml`` with its paths resolved against the run directory, so it opens from
    any working directory. A missing or unreadable file is a :class:`ConfigError` naming it."""
    from medistill.config import RunConfig, load_config

    cfg = load_config(Path(run) / "config.yaml")
    return RunConfig.model_validate(_path_fields(cfg.model_dump(mode="json"), lambda v: resolve_in_run(v, run)))


def teacher_run(checkpoint: str) -> Path | None:
    """The run a teacher came from (for an ensemble: its first member's run), or None for a
    weights file from elsewhere."""
    t = resolve(checkpoint)
    return run_dir_of(t.models[0]) if t.kind == "ensemble" else t.run


def teacher_training_images(checkpoint: str) -> tuple[str | None, set[int]] | None:
    """The data fingerprint and training-image indices a teacher was trained on, from its run's
    ``split.json`` (an ensemble: the union over its members); None for a file from elsewhere."""
    t = resolve(checkpoint)
    runs = [run_dir_of(m) for m in t.models] if t.kind == "ensemble" else [t.run]
    fps, idx = set(), set()
    for run in runs:
        if run is None:
            return None
        try:
            split = json.loads((run / "split.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        fps.add(split.get("fingerprint"))
        idx |= {int(i) for i in split.get("train", [])}
    return (fps.pop() if len(fps) == 1 else None), idx


def write_run_files(out: Path, cfg: Any, teachers: list[Any], students: list[Any], terms: Any, device: Any,
                    data: Any, teacher_amp: str = "off") -> None:
    """A new run's ``config.yaml`` (every default written out), ``run_info.json`` (environment,
    seed, teachers' checkpoints and hashes, student adaptations, term parameters, device, the
    teachers' precision ``teacher_amp`` as the engine resolved it) and ``split.json`` (the exact
    images of each split)."""
    from medistill.config import dump_config
    from medistill.device import device_info
    from medistill.io import environment_info, write_json, write_text

    write_text(out / "config.yaml", dump_config(portable_config(cfg, out)))
    info = environment_info()
    info["seed"] = cfg.train.seed
    info["teachers"] = {t.name: {"checkpoint": t.checkpoint, "sha256": t.sha256,
                                 **({"input": t.intake} if getattr(t, "intake", None) else {}),
                                 **({"trained_on_test_images": t.test_overlap} if getattr(t, "test_overlap", None) else {})}
                        for t in teachers}
    info["adaptations"] = {s.name: s.spec.adaptation for s in students}
    # Training-only modules of the terms (projectors, regressors): dropped after training.
    info["term_parameters"] = {k.replace("__", "."): n for k, t in terms.items()
                               if (n := sum(p.numel() for p in t.parameters()))}
    from medistill import dist

    info.update(device_info(device), amp=cfg.train.amp, world_size=dist.world(), dist_backend=dist.backend())
    if teachers:
        info["teacher_amp"] = teacher_amp
    write_json(out / "run_info.json", info)
    write_json(out / "split.json", data.split_record())


def is_ensemble_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def write_ensemble(directory: str | os.PathLike, members: list[str | os.PathLike],
                   aggregation: str = "prob_mean") -> dict[str, Any]:
    """Write ``ensemble.json`` for ``members`` (paths inside ``directory`` are stored relative
    to it). Members must agree on class count and class names; input sizes may differ (each
    member keeps its own preprocessing)."""
    from medistill.models.ensemble import AGGREGATIONS

    d = Path(directory)
    if len(members) < 2:
        raise ModelError(f"an ensemble needs at least 2 members, got {len(members)}")
    if aggregation not in AGGREGATIONS:
        raise ModelError(f"unknown ensemble aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
    rows, first = [], None
    for m in members:
        md = resolve_teacher(str(m))
        if not (md / "model.json").is_file() or not (md / "model.safetensors").is_file():
            raise ModelError(f"ensemble member {m}: expected a model directory or a run with one student")
        spec = json.loads((md / "model.json").read_text())
        if first is None:
            first = (md, spec)
        elif spec["num_classes"] != first[1]["num_classes"] or not same_classes(spec["class_names"], first[1]["class_names"]):
            raise ModelError(f"ensemble members disagree on the classes: {first[0]} has {first[1]['num_classes']} "
                             f"({', '.join(first[1]['class_names'])}), {md} has {spec['num_classes']} "
                             f"({', '.join(spec['class_names'])})")
        try:
            rel = os.path.relpath(md.resolve(), d.resolve())
        except ValueError:   # another drive (Windows): keep the absolute path
            rel = str(md.resolve())
        rows.append({"model_dir": rel, "arch": spec["arch"], "input_size": spec["input_size"],
                     "sha256": sha256_file(md / "model.safetensors")})
    record = {"format": 1, "aggregation": aggregation, "num_classes": first[1]["num_classes"],
              "class_names": first[1]["class_names"], "members": rows}
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / ENSEMBLE_FILE, record)
    return record


def read_ensemble(directory: str | os.PathLike) -> dict[str, Any]:
    p = Path(directory) / ENSEMBLE_FILE
    try:
        rec = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{p}: unreadable ensemble description ({e})") from e
    if not isinstance(rec, dict) or not rec.get("members"):
        raise ModelError(f"{p}: no members listed")
    if not isinstance(rec["members"], list):
        raise ModelError(f"{p}: `members` must be a list of rows, got {type(rec['members']).__name__}")
    for n, row in enumerate(rec["members"]):
        bad = [k for k in ("model_dir", "sha256") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if bad:
            raise ModelError(f"{p}: member {n} has no {' or '.join(bad)} (each row needs the member's model_dir and "
                             "the sha256 of its weights; `medistill ensemble` writes them)")
    return rec


def load_ensemble(directory: str | os.PathLike, check_hashes: bool = True
                  ) -> tuple[EnsembleModel, list[ModelSpecRecord], str, dict[str, Any]]:
    """Build the ensemble of ``directory``: the module, the members' specs, a sha256 that
    identifies the ensemble (aggregation + members' weight hashes, in order; the teacher cache
    is keyed by it) and the ``ensemble.json`` record. A member whose weights changed since the
    ensemble was written is an error naming it."""
    from medistill.models.ensemble import EnsembleModel
    from medistill.models.factory import load_model_dir

    d = Path(directory)
    rec = read_ensemble(d)
    members, specs = [], []
    for row in rec["members"]:
        md = (d / row["model_dir"]) if not Path(row["model_dir"]).is_absolute() else Path(row["model_dir"])
        if not (md / "model.json").is_file() or not (md / "model.safetensors").is_file():
            raise ModelError(f"ensemble {d}: member {row['model_dir']} is missing")
        if check_hashes and sha256_file(md / "model.safetensors") != row["sha256"]:
            raise ModelError(f"ensemble {d}: member {row['model_dir']} changed since the ensemble was written "
                             "(sha256 differs); rewrite ensemble.json or restore the member")
        model, pre, spec = load_model_dir(md)
        members.append((pre, model))
        specs.append(spec)
    ens = EnsembleModel(members, rec.get("aggregation", "prob_mean")).eval()
    digest = hashlib.sha256(json.dumps([rec.get("aggregation"), [r["sha256"] for r in rec["members"]]]).encode()).hexdigest()
    return ens, specs, digest, rec


def update_run_info(out: Path, **values: Any) -> None:
    """Add ``values`` to a run's ``run_info.json`` (e.g. the peak device memory, known at the end)."""
    write_json(out / "run_info.json", {**read_run_json(out / "run_info.json"), **values})
