"""Images without labels: the transfer set a teacher labels for the student.

Three formats, each refused when it carries labels (those images belong in ``--data``): a flat
folder of images, a CSV manifest with a ``path`` column and no ``label``, an ``.npz`` holding
``images`` only. The images get label −1 and index ids after the labelled source's (see
:class:`medistill.data.dataset.DataBundle`); a teacher cache covers them like training images.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from medistill.data import medmnist
from medistill.data.audit import content_hash
from medistill.data.checks import check_images
from medistill.data.filelist import fingerprint, probe_size
from medistill.data.sources import IMAGE_SUFFIXES, ImageSource, _manifest_paths
from medistill.errors import DataError

UNLABELED = -1   # the label of an image without one, in every batch


def open_unlabeled(name: str, channels: int) -> ImageSource:
    """The unlabelled images at ``name``, read with ``channels`` channels (the labelled data's)."""
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
                             fingerprint=fingerprint(rel, np.zeros(len(rel), dtype=np.int64), root), _paths=paths)


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
                             fingerprint=fingerprint(rel, np.zeros(len(rel), dtype=np.int64), root), _paths=paths)


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
    except ValueError as e:
        raise DataError(f"unlabelled archive {path}: not a .npz of arrays ({e})") from None
    except OSError as e:
        raise DataError(f"unlabelled archive {path}: not readable ({e})") from None
    images = check_images(images, f"{path}: images")
    if len(images) == 0:
        raise DataError(f"unlabelled archive {path} holds no images")
    return _unlabeled_source(str(path), len(images), channels=images.shape[-1],
                             native_size=images.shape[1] if images.shape[1] == images.shape[2] else None,
                             fingerprint=medmnist.md5_file(path), _arrays=images)


def content_hashes(source: ImageSource, indices: np.ndarray) -> dict[str, int]:
    """Content hash (the audit's: pixels of arrays, bytes of files) → first index, for ``indices``."""
    out: dict[str, int] = {}
    for i in indices:
        out.setdefault(content_hash(source, int(i), decode=False), int(i))
    return out


def check_unlabeled_leak(unl: ImageSource, labelled: ImageSource, splits: dict[str, np.ndarray]) -> None:
    """An unlabelled image that is also a validation or test image would let the teacher's
    outputs on it train the student: refused, naming the first such file."""
    mine = content_hashes(unl, np.arange(len(unl)))
    for split in ("val", "test"):
        theirs = content_hashes(labelled, splits[split])
        common = [h for h in mine if h in theirs]
        if common:
            raise DataError(f"{len(common)} unlabelled image(s) are copies of {split} images (e.g. {unl.path(mine[common[0]])} "
                            f"= {labelled.path(theirs[common[0]])}): the student would learn the teacher's answer on "
                            f"images it is scored on; remove them from the unlabelled set")


def add_unlabeled(cfg: Any, source: ImageSource, splits: dict[str, np.ndarray], check: bool) -> ImageSource | None:
    """Open ``data.unlabeled`` and give its images ids after the labelled source's (already in a
    saved split when ``check`` is False); refuse copies of validation or test images."""
    splits.setdefault("unlabeled", np.empty(0, dtype=np.int64))
    if not cfg.unlabeled:
        return None
    unl = open_unlabeled(cfg.unlabeled, source.channels)
    u = splits["unlabeled"]
    if u.size and (u.min() < 0 or u.max() >= len(source) + (0 if check else len(unl))):
        raise DataError(f"the saved split's unlabelled ids do not fit {cfg.unlabeled} ({len(unl)} images): other data?")
    if check:
        check_unlabeled_leak(unl, source, splits)
        splits["unlabeled"] = np.concatenate([splits["unlabeled"], len(source) + np.arange(len(unl))])
    return unl
