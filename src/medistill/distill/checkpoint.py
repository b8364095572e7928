"""Checkpoints: what a run saves after every epoch, how ``--resume`` restores it (falling back to
the previous epoch's file when the last one is unreadable), and the config check that keeps a
resumed run the same experiment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from medistill.config import RunConfig, dump_config
from medistill.errors import ConfigError
from medistill.io import torch_load, torch_save, write_text

LAST, PREVIOUS = "checkpoint_last.pt", "checkpoint_prev.pt"
# What makes a folder a medistill run (a crashed start leaves config.yaml; a finished run the rest).
RUN_MARKERS = {"config.yaml", "run_info.json", "split.json", LAST, PREVIOUS, "summary.json", "students"}


def check_out_folder(out: Path, cfg: RunConfig, resume: bool, force: bool, main: bool, world: int) -> None:
    """Before a run writes anything: ``--resume`` needs a checkpoint and the same settings; a new
    run refuses a folder holding the user's own files, another run's checkpoint, or a finished
    run whose checkpoints are gone (``force`` writes anyway). Rank 0 checks writability."""
    from medistill import dist
    from medistill.io import check_writable

    if resume and not has_checkpoint(out):
        raise ConfigError(f"--resume: no checkpoint_last.pt in {out}" + ("" if out.is_dir() else " (the folder does not exist)"))
    if main:
        check_writable(out)
    dist.barrier()
    if not resume and not force and not (world > 1 and not main):
        own = [p.name for p in out.iterdir()] if out.is_dir() else []
        if own and not set(own) & RUN_MARKERS:
            raise ConfigError(f"{out} holds other files ({', '.join(sorted(own)[:3])}{', …' if len(own) > 3 else ''}) "
                              "and no medistill run; choose a new or empty --out, or pass --force to write into it")
        if (out / LAST).exists():
            raise ConfigError(f"{out} already holds a run (checkpoint_last.pt); pass --resume to continue it "
                              "or choose another --out")
        held = [n for n in ("summary.json", "metrics.json") if (out / n).is_file()]
        if held or any((out / "students").glob("*/model.json")):
            raise ConfigError(f"{out} already holds a run ({', '.join(held) or 'students/'}) whose checkpoints "
                              "are gone; it is not trained over. Choose another --out, or delete the folder")
    if resume:
        check_resume_config(out / "config.yaml", cfg)


def save_checkpoint(out: Path, epoch: int, best: dict[str, float], bad: int, groups: dict[str, dict[str, Any]],
                    terms: nn.Module) -> None:
    """Write ``out/checkpoint_last.pt`` atomically; the file it replaces becomes
    ``checkpoint_prev.pt``. ``groups``: ``students``/``ema``/``swa``/``optim``/``sched`` → name →
    object with ``state_dict()``; ``terms``: the run's term modules (one state dict)."""
    state = {"epoch": epoch, "best": best, "bad_epochs": bad, "terms": terms.state_dict(),
             "rng_torch": torch.get_rng_state(),
             **{g: {k: v.state_dict() for k, v in items.items()} for g, items in groups.items()}}
    torch_save(out / LAST, state, keep_previous=out / PREVIOUS)


def has_checkpoint(out: Path) -> bool:
    return (out / LAST).exists() or (out / PREVIOUS).exists()


# What every checkpoint medistill writes holds (:func:`save_checkpoint`), with each value's type.
_CHECKPOINT_KEYS = {"epoch": int, "best": dict, "bad_epochs": int, "terms": dict, "rng_torch": torch.Tensor}


def read_checkpoint_file(path: Path, groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A checkpoint read with ``weights_only=True`` and checked to be medistill's: a dict with the
    keys and types :func:`save_checkpoint` writes and a state for every object of ``groups``.
    Anything else (cut short, a bare tensor, another program's file) is a :class:`ConfigError`
    naming the file and what it holds."""
    try:
        st = torch_load(path)
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "it was probably cut short") from None
    if not isinstance(st, dict):
        raise ConfigError(f"{path} is not a medistill checkpoint (it holds a {type(st).__name__}, not the dict of "
                          "training state medistill writes)")
    wrong = [k for k, t in _CHECKPOINT_KEYS.items() if not isinstance(st.get(k), t) or isinstance(st.get(k), bool)]
    missing = [f"{g}.{k}" for g, items in groups.items() for k in items
               if not isinstance(st.get(g), dict) or not isinstance(st[g].get(k), dict)]
    if wrong or missing:
        raise ConfigError(f"{path} is not a medistill checkpoint of this run (missing or malformed: "
                          f"{', '.join((wrong + missing)[:4])}{', …' if len(wrong + missing) > 4 else ''})")
    return st


def remove_stale_temporaries(out: Path) -> list[str]:
    """Delete the temporary files a killed write left in run folder ``out`` (``.NAME.XXXXXXXX.tmp``,
    :func:`medistill.io.atomic_path`'s pattern, never a complete artefact); return their names."""
    import re

    pattern = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
    gone = []
    for d in (out, *sorted((out / "students").glob("*"))):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and pattern.match(p.name):
                p.unlink(missing_ok=True)
                gone.append(str(p.relative_to(out)))
    return gone


def load_checkpoint(out: Path, groups: dict[str, dict[str, Any]], terms: nn.Module, console: Console,
                    trim_log: bool) -> tuple[int, dict[str, float], int]:
    """Restore every object of ``groups`` and ``terms`` and the RNG; return the epoch to start
    at, the best validation scores and the early-stopping counter. ``trim_log`` drops the
    ``metrics.jsonl`` lines of epochs after the checkpoint and the temporaries of killed writes
    (rank 0 only)."""
    last, prev = out / LAST, out / PREVIOUS
    try:
        st = read_checkpoint_file(last, groups)
    except ConfigError as e:   # a truncated or foreign file: fall back or say so
        why = str(e)
        try:
            st = read_checkpoint_file(prev, groups)
        except ConfigError:
            raise ConfigError(f"--resume: {why}, and there is no usable {prev.name}. Start a new --out, or "
                              "delete it to train from scratch") from e
        console.print(f"[yellow]warning:[/] {why}; resuming from {prev.name} (epoch {st['epoch'] + 1})")
    for g, items in groups.items():
        for k, v in items.items():
            try:
                v.load_state_dict(st[g][k])
            except (ValueError, KeyError, RuntimeError) as e:
                # e.g. an optimizer saved before its parameter groups were split by weight decay
                raise ConfigError(f"--resume: the checkpoint's {g} state of {k!r} does not fit this version of "
                                  f"medistill ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                  "finish the run with the version that started it, or start a new --out") from e
    terms.load_state_dict(st["terms"])
    torch.set_rng_state(st["rng_torch"])
    if trim_log and (gone := remove_stale_temporaries(out)):
        console.print(f"removed {len(gone)} temporary file(s) an interrupted write left: {', '.join(gone[:3])}")
    log = out / "metrics.jsonl"
    if log.is_file() and trim_log:
        keep, damaged = [], 0
        for ln in log.read_text(errors="replace").splitlines():
            try:
                if ln.strip() and json.loads(ln)["epoch"] <= st["epoch"]:
                    keep.append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):
                damaged += 1    # the log is a record, not state: a damaged line is dropped, and said so
        if damaged:
            console.print(f"[yellow]warning:[/] {log}: {damaged} damaged line(s) dropped")
        write_text(log, "".join(ln + "\n" for ln in keep))
    return st["epoch"] + 1, {k: float(v) for k, v in st["best"].items()}, int(st["bad_epochs"])


# Settings that may change between an interrupted run and its resumption: they do not alter what is trained.
_RESUME_FREE = {"out", "train.progress", "train.latency", "train.threads", "train.cache_dir", "data.num_workers",
                "data.prefetch_factor", "train.device"}
def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: d}


def check_resume_config(saved_path: Path, cfg: RunConfig) -> None:
    """A resumed run must continue the same experiment: any other difference from the saved
    ``config.yaml`` (schedule, amp, terms, data, ...) would silently mix two runs. All differences
    are listed. The one change allowed is a larger ``train.epochs``: the run then continues to the
    new total, and the learning-rate schedule is recomputed for it from the current epoch on."""
    import yaml

    from medistill.rundir import _path_fields, portable_path, resolve_in_run

    if not saved_path.is_file():
        raise ConfigError(f"--resume: {saved_path} is missing; cannot check that the run continues the same config")
    run = saved_path.parent

    def norm(tree: dict[str, Any]) -> dict[str, Any]:
        return _flat(_path_fields(tree, lambda v: portable_path(resolve_in_run(v, run), run)))

    try:
        old = norm(RunConfig.model_validate(yaml.safe_load(saved_path.read_text())).model_dump(mode="json"))
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file is reported with its path
        raise ConfigError(f"--resume: {saved_path} is unreadable ({type(e).__name__}); cannot check that the run "
                          "continues the same config") from e
    new = norm(yaml.safe_load(dump_config(cfg)))
    # the saved config is re-validated first, so a key added to the schema since it was written
    # takes its default on both sides and is no difference
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _RESUME_FREE)
    if "train.epochs" in diff and int(new["train.epochs"]) > int(old["train.epochs"]):
        diff.remove("train.epochs")
    if diff:
        shown = "; ".join(f"{k}: saved {old.get(k)!r}, given {new.get(k)!r}" for k in diff)
        raise ConfigError(f"--resume: the given settings differ from the interrupted run's {saved_path.name} ({shown}). "
                          "Resume with the same settings (only a larger --epochs may change), or start a new --out")
