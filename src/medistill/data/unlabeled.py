"""Images without labels: the transfer set a teacher labels for the student.

Three formats, each refused when it carries labels (those images belong in ``--data``): a flat
folder of images, a CSV manifest with a ``path`` column and no ``label``, an ``.npz`` holding
``images`` only. The images get label −1 and index ids after the labelled source's (see
:class:`medistill.data.dataset.DataBundle`); a teacher cache covers them like training images.
"""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from medistill.data import medmnist
from medistill.data.audit import file_digests
from medistill.data.checks import check_images
from medistill.data.filelist import fingerprint, probe_size
from medistill.data.sources import IMAGE_SUFFIXES, ImageSource, _manifest_paths
from medistill.errors import DataError

UNLABELED = -1   # the label of an image without one, in every batch


def open_unlabeled(name: str, channels: int) -> ImageSource:
    """The unlabelled images at ``name``, read with ``channels`` channels (the labelled data's)."""
    if not str(name).strip():
        raise DataError("data.unlabeled / --unlabeled is an empty string (an unset shell variable?): give a folder of "
                        "images, a CSV with a path column or an .npz with `images`, or leave the option out")
    p = Path(name).expanduser()
    if not p.exists():
        raise DataError(f"unlabelled images not found: {name} (data.unlabeled / --unlabeled takes a folder of "
                        "images, a CSV with a path column, or an .npz with an `images` array)")
    if p.is_dir():
        src = _from_folder(p)
    elif p.suffix.lower() == ".csv":
        src = _from_csv(p)
    elif p.suffix.lower() == ".npz":
        src = _from_npz(p)
    else:
        raise DataError(f"unlabelled images {name}: not a folder, .csv or .npz")
    if src.in_memory and src.channels != channels:
        raise DataError(f"unlabelled images {name} have {src.channels} channel(s) but the labelled data has {channels}")
    src.channels = channels   # files are converted on reading, like the labelled data's
    return src


def _unlabeled_source(description: str, n: int, **kw: object) -> ImageSource:
    return ImageSource(description=description, labels=np.full(n, UNLABELED, dtype=np.int64), class_names=[],
                       **kw)  # type: ignore[arg-type]


def _from_folder(root: Path) -> ImageSource:
    """Every image file directly in ``root``; sub-folders holding images mean classes, refused."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.rglob("*") if f.is_file()))
    if classes:
        raise DataError(f"unlabelled folder {root} holds class-like sub-folders with images ({', '.join(classes[:4])}"
                        f"{', …' if len(classes) > 4 else ''}): labelled images go in --data; for unlabelled images "
                        "put the files directly in one folder")
    paths = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"unlabelled folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    rel = [p.name for p in paths]
    return _unlabeled_source(str(root), len(paths), channels=3, native_size=probe_size(paths),
                             fingerprint=fingerprint(rel, np.zeros(len(rel), dtype=np.int64), root, ns=True), _paths=paths)


def _from_csv(manifest: Path) -> ImageSource:
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"unlabelled manifest {manifest}: not a readable UTF-8 CSV file ({e})") from None
    if "path" not in cols:
        raise DataError(f"unlabelled manifest {manifest}: header must contain 'path' (got {cols})")
    if "label" in cols:
        raise DataError(f"unlabelled manifest {manifest} has a label column: labelled images go in --data; "
                        "drop the column to use them as unlabelled images")
    if "split" in cols:
        raise DataError(f"unlabelled manifest {manifest} has a split column: unlabelled images are training images only")
    if not rows:
        raise DataError(f"unlabelled manifest {manifest}: no rows")
    root = manifest.parent.resolve()
    paths, _tags = _manifest_paths(manifest, root, rows)
    rel = [str(p.relative_to(root)) for p in paths]
    return _unlabeled_source(str(manifest), len(paths), channels=3, native_size=probe_size(paths),
                             fingerprint=fingerprint(rel, np.zeros(len(rel), dtype=np.int64), root, ns=True), _paths=paths)


def _from_npz(path: Path) -> ImageSource:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            if any(k.endswith("labels") for k in keys):
                raise DataError(f"unlabelled archive {path} holds labels ({', '.join(k for k in keys if k.endswith('labels'))}): "
                                "labelled images go in --data; save the unlabelled ones as `images` only")
            if "images" not in keys:
                raise DataError(f"unlabelled archive {path} has no `images` array (found {keys})")
            images = z["images"]
    except (ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"unlabelled archive {path}: not a readable .npz of arrays ({type(e).__name__}: {e}; "
                        "cut short in a copy?)") from None
    except OSError as e:
        raise DataError(f"unlabelled archive {path}: not readable ({e})") from None
    images = check_images(images, f"{path}: images")
    if len(images) == 0:
        raise DataError(f"unlabelled archive {path} holds no images")
    return _unlabeled_source(str(path), len(images), channels=images.shape[-1],
                             native_size=images.shape[1] if images.shape[1] == images.shape[2] else None,
                             fingerprint=medmnist.md5_file(path), _arrays=images)


def check_unlabeled_copies(unl: ImageSource, labelled: ImageSource, splits: dict[str, np.ndarray], mode: str,
                           notes: list[str]) -> np.ndarray:
    """The pool images (local ids) to keep after comparing decoded pixels — whatever each side's
    file format — with the labelled images. A copy of a validation or test image would let the
    teacher's outputs on it train the student: refused (dropped under ``data.duplicates=drop``).
    A copy of a training image is reported as ``data.duplicates`` says (warn: a note; error:
    refused; drop: dropped; off: kept, not checked)."""
    keep = np.ones(len(unl), dtype=bool)
    if len(unl) == 0:
        return np.flatnonzero(keep)
    mine = file_digests(unl, list(range(len(unl))), decode=True)
    for split in ("val", "test", "train"):
        if split == "train" and mode == "off":
            continue
        theirs = {h: i for i, h in file_digests(labelled, [int(i) for i in splits[split]], decode=True).items()}
        common = [i for i, h in mine.items() if h in theirs and keep[i]]
        if not common:
            continue
        first = common[0]
        said = (f"{len(common)} unlabelled image(s) are copies of {split} images (e.g. {unl.path(first)} = "
                f"{labelled.path(theirs[mine[first]])})")
        if mode == "drop":
            keep[common] = False
            notes.append(f"data.duplicates=drop: {said}; removed from the unlabelled pool")
        elif split != "train":
            raise DataError(f"{said}: the student would learn the teacher's answer on images it is scored on; remove "
                            "them from the unlabelled set, or set data.duplicates=drop to leave them out")
        elif mode == "error":
            raise DataError(f"{said}: a labelled image again without its label; remove them from the unlabelled set, "
                            "or set data.duplicates=warn (or drop) to go on")
        else:
            notes.append(f"{said}: they train twice, once with their label; data.duplicates=drop leaves them out")
    if not keep.any():
        raise DataError(f"every image of the unlabelled set {unl.description} copies a labelled image; nothing is left "
                        "to learn from")
    return np.flatnonzero(keep)


def _names(unl: ImageSource) -> list[str]:
    """The pool's image files relative to its folder (a CSV's: the manifest's folder)."""
    root = Path(unl.description)
    root = root if root.is_dir() else root.parent
    return [os.path.relpath(unl.path(i), root) for i in range(len(unl))]


def pool_identity(unl: ImageSource, kept: np.ndarray) -> dict[str, object]:
    """What a run records of its unlabelled pool (``split.json``), so that ``--resume`` can refuse
    a changed one and say what changed: the source, its fingerprint (names, sizes and modification
    times of files; an archive's md5), the file names, and the ids kept after the copy check."""
    rec: dict[str, object] = {"description": unl.description, "fingerprint": unl.fingerprint, "images": len(unl)}
    if not unl.in_memory:
        rec["files"] = _names(unl)
    if len(kept) != len(unl):
        rec["kept"] = [int(i) for i in kept]
    return rec


def _pool_changes(saved: dict[str, object], unl: ImageSource) -> str:
    """What differs between a saved pool identity and the pool at ``unl`` (for the refusal)."""
    old = list(saved.get("files") or [])   # type: ignore[call-overload]
    if not old or unl.in_memory:
        return f"{saved.get('images')} image(s) then, {len(unl)} now, other content"
    new = _names(unl)
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    parts = [f"{len(added)} added (e.g. {added[0]})"] if added else []
    parts += [f"{len(removed)} removed (e.g. {removed[0]})"] if removed else []
    if not parts:
        parts.append("the same names, but files replaced or edited (other sizes or modification times)")
    elif new[:len(old)] != old[:len(new)]:
        parts.append("the order of the remaining files moved")
    return "; ".join(parts)


def add_unlabeled(cfg: Any, source: ImageSource, splits: dict[str, np.ndarray], check: bool, notes: list[str],
                  saved_pool: dict[str, object] | None = None) -> ImageSource | None:
    """Open ``data.unlabeled`` and give its images ids after the labelled source's. A new split
    (``check``) compares the pool with the labelled images (:func:`check_unlabeled_copies`); a
    saved one (``--resume``, with its ``saved_pool`` identity) refuses a changed archive."""
    splits.setdefault("unlabeled", np.empty(0, dtype=np.int64))
    if cfg.unlabeled is None:
        return None
    unl = open_unlabeled(cfg.unlabeled, source.channels)
    if not check:
        # runs saved before the pool's file names were recorded hold a fingerprint of another kind
        comparable = saved_pool is not None and ("files" in saved_pool or unl.in_memory)
        if comparable and saved_pool.get("fingerprint") != unl.fingerprint:  # type: ignore[union-attr]
            raise DataError(f"the unlabelled images at {cfg.unlabeled} changed since the run's split was saved "
                            f"({_pool_changes(saved_pool, unl)}): the saved ids would point at other pictures; "
                            "restore the archive, or start a new --out")
        u = splits["unlabeled"]
        if u.size and (u.min() < 0 or u.max() >= len(source) + len(unl)):
            raise DataError(f"the saved split's unlabelled ids do not fit {cfg.unlabeled} ({len(unl)} images): other data?")
        return unl
    kept = check_unlabeled_copies(unl, source, splits, cfg.duplicates, notes)
    splits["unlabeled"] = np.concatenate([splits["unlabeled"], len(source) + kept])
    return unl
