"""Teacher-output cache: teacher logits (and tapped features) computed once per
(data, split, view set, teacher checkpoint, preprocessing), stored as safetensors with a JSON
manifest, refused on any mismatch.

Valid only when the teacher's view of every training image can be enumerated: no augmentation,
a finite view set (``flip``, ``dihedral``) whose views are all cached, or ``standard`` drawn from
``train.teacher_views`` fixed random crops per image (:class:`~medistill.data.transforms.FixedCrops`).
Batch mixing makes a cache invalid — the engine then runs the teacher on every batch and says why.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from medistill import dist
from medistill.config import RunConfig
from medistill.data.transforms import FIXED_VIEW_BASE, views_for
from medistill.device import autocast
from medistill.errors import CacheDamagedError, CacheMismatchError, ConfigError, MedistillError
from medistill.progress import steps
from medistill.io import atomic_write, cache_root, write_json
from medistill.models.taps import FeatureTaps
from medistill.models.modes import model_device


def default_cache_dir() -> Path:
    """Teacher caches: ``$MEDISTILL_CACHE_DIR`` itself when set (as it always has been), else the
    ``teacher_cache`` folder of the user cache."""
    return cache_root() if os.environ.get("MEDISTILL_CACHE_DIR") else cache_root() / "teacher_cache"


def manifest_key(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


class TeacherCache:
    """Outputs ``[V, N, ...]`` for V views of the N training images of one teacher."""

    def __init__(self, manifest: dict[str, Any], outputs: dict[str, torch.Tensor], positions: torch.Tensor):
        self.manifest = manifest
        self.outputs = outputs                    # name ("logits" or tap) → [V, N, ...]
        self.views: list[int] = manifest["views"]
        self.positions = positions                # source index → row, −1 where absent
        # view id → row of ``outputs`` (−1: not cached), a tensor so a lookup is one gather
        self.view_rows = torch.full((max(self.views) + 1,), -1, dtype=torch.long)
        self.view_rows[torch.as_tensor(self.views)] = torch.arange(len(self.views))

    def to(self, device: torch.device) -> "TeacherCache":
        """Hold the outputs on ``device`` (``data.resident``: batches are gathered there too)."""
        self.outputs = {k: v.to(device) for k, v in self.outputs.items()}
        self.positions, self.view_rows = self.positions.to(device), self.view_rows.to(device)
        return self

    def lookup(self, source_idx: torch.Tensor, view: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs ``{name: [B, ...]}`` for source images ``source_idx [B]`` seen in views ``view [B]``,
        on the cache's device. One check of both indices, as one device sync per step."""
        dev = self.positions.device
        rows = self.positions[source_idx.to(dev)]
        view = view.to(dev)
        vrows = self.view_rows[view.clamp(0, len(self.view_rows) - 1)]
        if bool(((rows < 0) | (vrows < 0) | (view >= len(self.view_rows))).any()):
            raise CacheMismatchError("teacher cache has no entry for some training images or views (other split "
                                     "or augmentation?)")
        return {k: t[vrows, rows] for k, t in self.outputs.items()}

    @staticmethod
    def paths(directory: Path, manifest: dict[str, Any]) -> tuple[Path, Path]:
        key = manifest_key(manifest)[:20]
        stem = f"{manifest['teacher_name']}-{key}"
        return directory / f"{stem}.safetensors", directory / f"{stem}.json"

    def save(self, directory: Path) -> Path:
        """Write the outputs (safetensors, whose metadata holds the manifest's sha256) and then the
        manifest; :meth:`load` checks one against the other."""
        data_path, meta_path = self.paths(directory, self.manifest)
        tensors = {f"out.{k}": v.contiguous() for k, v in self.outputs.items()}
        tensors["positions"] = self.positions
        meta = {"manifest_sha256": manifest_key(self.manifest)}
        atomic_write(data_path, lambda p: save_file(tensors, str(p), metadata=meta))
        write_json(meta_path, self.manifest)
        return data_path

    @classmethod
    def load(cls, data_path: Path, expected: dict[str, Any]) -> "TeacherCache":
        """Load and verify: the manifest parses and matches ``expected`` field by field (a
        difference is a :class:`CacheMismatchError`); the data file's header parses, names this
        manifest's sha256, and every tensor is whole and of the manifest's shape (anything else is
        a :class:`CacheDamagedError`: a killed or disk-full build, an overwritten file)."""
        meta_path = data_path.with_suffix(".json")
        if not meta_path.is_file():
            raise CacheDamagedError(f"no manifest {meta_path.name} beside the cache")
        try:
            found = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheDamagedError(f"its manifest {meta_path.name} is unreadable ({type(e).__name__})") from None
        if not isinstance(found, dict):
            raise CacheDamagedError(f"its manifest {meta_path.name} is not a JSON object")
        diff = [k for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
        if diff:
            k = diff[0]
            raise CacheMismatchError(
                f"teacher cache {data_path} was built for another configuration: {k} is "
                f"{_short(found.get(k))} there but {_short(expected.get(k))} now"
                + (f" (and {len(diff) - 1} more field(s))" if len(diff) > 1 else "")
            )
        try:
            with safe_open(str(data_path), framework="pt") as f:
                stamp = (f.metadata() or {}).get("manifest_sha256")
            t = load_file(str(data_path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
            raise CacheDamagedError(f"the data file is unreadable ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''})") from None
        # caches written before the stamp carry none; those are checked by shape alone
        if stamp is not None and stamp != manifest_key(found):
            raise CacheDamagedError("the data file was written for another manifest (its stamp differs)")
        outputs = {k[4:]: v for k, v in t.items() if k.startswith("out.")}
        positions = t.get("positions")
        n = int((positions >= 0).sum()) if positions is not None and positions.dim() == 1 else -1
        bad = [k for k, v in outputs.items() if v.dim() < 2 or v.shape[0] != len(found["views"]) or v.shape[1] != n]
        if positions is None or n < 0 or sorted(outputs) != sorted(found["outputs"]) or bad:
            raise CacheDamagedError("its tensors do not have the shapes its manifest describes")
        return cls(found, outputs, positions)


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) < 70 else s[:67] + "..."


def _refusals(teachers: list[Any], cfg: RunConfig, tap_shapes: dict[str, dict[str, tuple[int, ...]]],
              rows: int) -> list[str]:
    """Why a cache of ``rows`` (views × images) outputs per teacher would be wrong or too large."""
    reasons = []
    if cfg.train.mix != "none":
        reasons.append(f"mixing augmentation (train.mix={cfg.train.mix}) makes every batch new; the teacher runs live")
    # The cache lives in memory during training (float32, every view of every training image).
    values = sum(1 + sum(math.prod(tap_shapes[t.name][tap][1:]) for tap in t.taps) for t in teachers)
    size_mb = values * 4 * rows / 2**20
    if size_mb > cfg.train.teacher_cache_max_mb:
        reasons.append(f"the teacher outputs would take {size_mb:.0f} MB "
                       f"(> train.teacher_cache_max_mb = {cfg.train.teacher_cache_max_mb:.0f})")
    return reasons


def _manifest(t: Any, data: Any, views: list[int], train_idx: np.ndarray, view_seed: int | None,
              unlabeled: bool, amp: str = "off") -> dict[str, Any]:
    """What a cache of teacher ``t`` depends on; a cache is reused only when all of it matches."""
    manifest = {
        "format": 1, "teacher_name": t.name, "teacher_sha256": t.sha256,
        "data_fingerprint": data.source.fingerprint,
        "train_indices_sha256": hashlib.sha256(np.asarray(train_idx, dtype=np.int64).tobytes()).hexdigest(),
        "image_size": data.image_size, "views": views,
        "preprocess": {"input_size": t.pre.input_size, "in_chans": t.pre.in_chans,
                       "mean": t.pre.mean.flatten().tolist(), "std": t.pre.std.flatten().tolist()},
        "outputs": sorted(["logits", *t.taps]),
    }
    if unlabeled and data.unlabeled is not None:   # (absent otherwise: earlier caches stay valid)
        manifest["unlabeled_fingerprint"] = data.unlabeled.fingerprint
    if view_seed is not None:   # fixed crops: the crops depend on their seed
        manifest["view_seed"] = view_seed
    if amp != "off":   # outputs under bf16/fp16 autocast differ from fp32 ones (absent for fp32: earlier caches stay valid)
        manifest["amp"] = amp
    return manifest


def make_teacher_caches(teachers: list[Any], data: Any, cfg: RunConfig, tap_shapes: dict[str, dict[str, tuple[int, ...]]],
                        console: Console, main: bool = True, world: int = 1, unlabeled: bool = False,
                        amp: str = "off") -> dict[str, TeacherCache]:
    """Load or build the cache of every teacher (``train.teacher_cache``: auto/on/off); return
    those that are valid. Under ``auto`` a cache that would be wrong (random augmentation) or
    too large is skipped with the reason printed; under ``on`` that is an error. ``unlabeled``:
    the unlabelled pool trains too, so its images are cached like the training images; ``amp``:
    the teachers' precision (:func:`medistill.device.teacher_amp`), part of each cache's identity."""
    mode = cfg.train.teacher_cache
    if not teachers or mode == "off":
        return {}
    standard = cfg.data.augment == "standard"
    views = list(range(FIXED_VIEW_BASE, FIXED_VIEW_BASE + cfg.train.teacher_views)) if standard \
        else views_for(cfg.data.augment)
    train_idx = data.train_indices(unlabeled)
    reasons = _refusals(teachers, cfg, tap_shapes, len(views) * len(train_idx))
    if reasons:
        if mode == "on":
            raise ConfigError("teacher cache requested but invalid: " + "; ".join(reasons))
        console.print("[yellow]teacher cache off:[/] " + "; ".join(reasons))
        return {}
    directory = _writable_cache_dir(Path(cfg.train.cache_dir) if cfg.train.cache_dir else default_cache_dir(), cfg,
                                    console if main else None)
    if standard:
        # seeded by the split, not train.seed: one cache serves every training seed
        data.use_fixed_crops(cfg.train.teacher_views, cfg.data.split_seed)
        console.print(f"teacher cache: data.augment=standard draws from {cfg.train.teacher_views} fixed random crops "
                      "per image (train.teacher_views), so the teacher's outputs are computed once; "
                      "train.teacher_cache=off gives a fresh crop every epoch with the teacher run live")
    caches = {}
    for t in teachers:
        manifest = _manifest(t, data, views, train_idx, cfg.data.split_seed if standard else None, unlabeled, amp)
        data_path, _ = TeacherCache.paths(directory, manifest)
        if not main:
            dist.barrier()   # rank 0 builds or checks the cache first
            caches[t.name] = TeacherCache.load(data_path, manifest)
            continue
        cache = _load_or_set_aside(data_path, manifest, console) if data_path.is_file() else None
        if cache is not None:
            caches[t.name] = cache
            console.print(f"teacher cache hit: {data_path}")
        else:
            t0 = time.perf_counter()
            caches[t.name] = build_cache(t, manifest, views, train_idx, data, cfg,
                                         console if cfg.train.progress else None, unlabeled, amp)
            caches[t.name].save(directory)
            took = time.perf_counter() - t0
            console.print(f"teacher cache built: {data_path} ({len(train_idx)} images × {len(views)} view(s) in "
                          f"{took:.1f} s, {len(train_idx) / max(took, 1e-9):.1f} images/s)")
        if world > 1:
            dist.barrier()
    return caches


def _writable_cache_dir(directory: Path, cfg: RunConfig, console: Console | None) -> Path:
    """``directory`` when a file can be created there, else the run's own ``teacher_cache/``
    folder, said in one line (on ``console``). Tried by creating a file, not by permission bits,
    which do not bind root."""
    import tempfile

    for d in (directory, Path(cfg.out) / "teacher_cache"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            if d != directory:
                raise ConfigError(f"no writable folder for the teacher cache: {directory} ({e.strerror or e}) nor {d}; "
                                  "set train.cache_dir to a writable folder") from None
            reason = e.strerror or type(e).__name__
            continue
        if d != directory and console is not None:
            console.print(f"[yellow]teacher cache:[/] {directory} is not writable ({reason}); using this run's own "
                          f"cache {d} (set train.cache_dir to share one)")
        return d
    raise AssertionError("unreachable")


def _load_or_set_aside(data_path: Path, manifest: dict[str, Any], console: Console) -> TeacherCache | None:
    """The cache at ``data_path``, or None after moving a damaged or foreign one aside (renamed
    ``*.damaged-TIME``, never deleted: a person may want to see why), said in one line."""
    try:
        return TeacherCache.load(data_path, manifest)
    except (CacheDamagedError, CacheMismatchError) as e:
        why = str(e).replace(f"teacher cache {data_path} ", "")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for p in (data_path, data_path.with_suffix(".json")):
            if p.exists():
                aside = p.with_name(f"{p.stem}.damaged-{stamp}{p.suffix}")
                try:
                    os.replace(p, aside)
                except OSError as err:
                    raise MedistillError(f"teacher cache {data_path} is damaged ({why}) and could not be moved aside "
                                         f"({err.strerror or err}); delete it or set train.cache_dir") from None
                moved.append(aside.name)
        console.print(f"[yellow]teacher cache damaged:[/] {data_path}: {why}; moved aside ({', '.join(moved)}) and "
                      "rebuilt")
        return None


@torch.no_grad()
def build_cache(t: Any, manifest: dict[str, Any], views: list[int], train_idx: np.ndarray, data: Any,
                cfg: RunConfig, console: Any = None, unlabeled: bool = False, amp: str = "off") -> TeacherCache:
    """Run teacher ``t`` over every view of every training image (and of the unlabelled pool's
    with ``unlabeled``), in precision ``amp``; each image is decoded once for all its
    views (the loader yields ``[B, V, C, S, S]``), batches are bounded by ``train.eval_batch_mb``.
    A progress bar with the time left on ``console`` (none without one)."""
    n = len(train_idx)
    positions = torch.full((data.index_size,), -1, dtype=torch.long)
    positions[torch.as_tensor(train_idx)] = torch.arange(n)
    outs: dict[str, torch.Tensor] = {}
    batch = data.eval_batch(cfg.train.eval_batch_size, cfg.train.eval_batch_mb, views=len(views))
    loader = DataLoader(data.dataset("train", train=False, unlabeled=unlabeled, views=views), batch_size=batch,
                        **data.workers())
    device = model_device(t.model)
    with FeatureTaps(t.model, sorted(t.taps), detach=True) as taps, \
            steps(console, f"teacher cache {t.name}", len(loader), enabled=console is not None) as advance:
        for x, _y, idx, _ in loader:
            advance(f"{len(views)} view(s) per image")
            rows = positions[torch.as_tensor(idx)]
            for vi in range(len(views)):
                with autocast(device, amp):
                    logits = t.logits(x[:, vi].to(device, non_blocking=True), cfg.train.channels_last).float()
                # stored on the CPU; each batch's rows are moved to the device when looked up
                got = {"logits": logits.cpu(), **{k: taps[k].float().cpu() for k in t.taps}}
                for k, val in got.items():
                    if k not in outs:
                        outs[k] = torch.zeros(len(views), n, *val.shape[1:])
                    outs[k][vi, rows] = val
    return TeacherCache(manifest, outs, positions)


@torch.no_grad()
def teacher_class_means(t: Any, tap: str, loader: Any, device: torch.device, num_classes: int,
                        path: Path, write: bool) -> torch.Tensor:
    """Mean of teacher ``t``'s flattened tap ``tap`` per training class ``[K, D]`` (ND's class
    centres), read from ``path`` when present, else computed over ``loader`` (float64 sums) and
    written there when ``write``."""
    if path.is_file():
        try:
            means = load_file(str(path))["means"]
            if means.shape[0] == num_classes:
                return means
        except Exception:  # noqa: BLE001 - derived data cut short or overwritten: recomputed below
            pass
    sums, n = None, torch.zeros(num_classes)
    with FeatureTaps(t.model, [tap], detach=True) as taps:
        for x, y, _i, _v in loader:
            t.logits(x.to(device))
            e = taps[tap].flatten(1).double().cpu()
            sums = torch.zeros(num_classes, e.shape[1], dtype=torch.float64) if sums is None else sums
            sums.index_add_(0, torch.as_tensor(y), e)
            n += torch.bincount(torch.as_tensor(y), minlength=num_classes)
    means = (sums / n.clamp_min(1)[:, None].double()).float()
    if write:
        atomic_write(path, lambda p: save_file({"means": means}, str(p)))
    return means
