"""Image sources: MedMNIST arrays, image folders and CSV manifests behind one interface.

A source knows how many images it has, their labels, an optional predefined split, and how
to load image ``i`` as a uint8 array ``[H, W, C]``. Folder and CSV images are read lazily
with PIL, only when a batch needs them.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medistill.data import medmnist
from medistill.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}


def pil_to_array(img: Image.Image, channels: int) -> np.ndarray:
    """Any PIL mode (L, RGB, RGBA, P, I;16, I, F) → uint8 ``[H, W, channels]``."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


@dataclass
class ImageSource:
    """Labels, optional split tags and a loader for each image."""

    description: str
    labels: np.ndarray                      # [N] int64
    class_names: list[str]
    channels: int
    native_size: int | None                 # square side when all images share it
    split_tags: np.ndarray | None = None    # [N] of "train" / "val" / "test", when the dataset has its own
    fingerprint: str = ""
    _arrays: np.ndarray | None = None       # MedMNIST: [N, H, W, C] uint8
    _paths: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 ``[H, W, C]``; a corrupt file raises :class:`DataError` naming it."""
        if self._arrays is not None:
            return self._arrays[i]
        path = self._paths[i]
        try:
            with Image.open(path) as img:
                img.load()
                return pil_to_array(img, self.channels)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"corrupt or unreadable image {path}: {e}") from e

    def path(self, i: int) -> str:
        return str(self._paths[i]) if self._paths else f"{self.description}[{i}]"


def from_medmnist(name: str, download: bool = False) -> ImageSource:
    path = medmnist.resolve(name, download=download)
    arrays = medmnist.load_npz(path)
    imgs, labels, tags = [], [], []
    for s in SPLIT_NAMES:
        im = arrays[f"{s}_images"]
        if im.ndim == 3:
            im = im[..., None]
        imgs.append(im)
        labels.append(arrays[f"{s}_labels"].reshape(-1).astype(np.int64))
        tags.extend([s] * len(im))
    images = np.concatenate(imgs)
    y = np.concatenate(labels)
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8, got {images.dtype}")
    if y.min() < 0:
        raise DataError(f"{path}: negative label {int(y.min())}")
    n_classes = int(y.max()) + 1
    return ImageSource(
        description=str(path), labels=y, class_names=[str(c) for c in range(n_classes)],
        channels=images.shape[-1], native_size=images.shape[1] if images.shape[1] == images.shape[2] else None,
        split_tags=np.array(tags), fingerprint=medmnist.md5_file(path), _arrays=images,
    )


def _probe_channels(paths: list[Path]) -> int:
    """1 if the first readable images are all single-channel, else 3."""
    modes = set()
    for p in paths[:16]:
        try:
            with Image.open(p) as img:
                modes.add(img.mode)
        except (UnidentifiedImageError, OSError):
            continue
    gray = {"L", "I;16", "I;16B", "I;16L", "I", "F", "1"}
    return 1 if modes and modes <= gray else 3


def _probe_size(paths: list[Path]) -> int | None:
    sizes = set()
    for p in paths[:16]:
        try:
            with Image.open(p) as img:
                sizes.add(img.size)
        except (UnidentifiedImageError, OSError):
            continue
    if len(sizes) == 1:
        w, h = sizes.pop()
        if w == h:
            return w
    return None


def _fingerprint(rel_paths: list[str], labels: np.ndarray, root: Path) -> str:
    h = hashlib.sha256()
    for rp, y in zip(rel_paths, labels.tolist()):
        st = (root / rp).stat()
        h.update(f"{rp}\0{y}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()


def from_folder(root: str | Path) -> ImageSource:
    """``root/CLASS/*.png`` or ``root/{train,val,test}/CLASS/*.png``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    split_dirs = {_SPLIT_ALIASES[d.name.lower()]: d for d in subdirs if d.name.lower() in _SPLIT_ALIASES}
    layout = split_dirs if split_dirs else {None: root}
    class_names = sorted({c.name for base in layout.values() for c in base.iterdir() if c.is_dir()})
    if not class_names:
        raise DataError(f"{root}: no class sub-folders found (expected root/CLASS/image.png)")
    paths, labels, tags = [], [], []
    for split, base in layout.items():
        for ci, cname in enumerate(class_names):
            cdir = base / cname
            if not cdir.is_dir():
                continue
            files = sorted(f for f in cdir.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            skipped = [f for f in cdir.iterdir() if f.is_file() and f.suffix.lower() not in IMAGE_SUFFIXES]
            if skipped:
                warnings.warn(f"{cdir}: ignored {len(skipped)} non-image file(s), e.g. {skipped[0].name}", stacklevel=2)
            if not files and split is None:
                raise DataError(f"class folder {cdir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(files)
            labels.extend([ci] * len(files))
            tags.extend([split] * len(files))
    if not paths:
        raise DataError(f"{root}: no images found")
    y = np.array(labels, dtype=np.int64)
    rel = [str(p.relative_to(root)) for p in paths]
    return ImageSource(
        description=str(root), labels=y, class_names=class_names, channels=_probe_channels(paths),
        native_size=_probe_size(paths), split_tags=np.array(tags) if split_dirs else None,
        fingerprint=_fingerprint(rel, y, root), _paths=paths,
    )


def from_csv(manifest: str | Path) -> ImageSource:
    """CSV with header ``path,label[,split]``; paths are relative to the manifest's folder.

    Paths that escape that folder (``..``, absolute paths elsewhere, symlinks out) are refused.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"CSV manifest not found: {manifest}")
    root = manifest.parent.resolve()
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in cols or "label" not in cols:
            raise DataError(f"{manifest}: header must contain 'path' and 'label' (got {reader.fieldnames})")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    if not rows:
        raise DataError(f"{manifest}: no rows")
    raw_labels = [r["label"] for r in rows]
    if all(_is_int(v) for v in raw_labels):
        ints = sorted({int(v) for v in raw_labels})
        if ints[0] < 0:
            raise DataError(f"{manifest}: negative label {ints[0]}")
        class_names = [str(i) for i in range(ints[-1] + 1)]
        y = np.array([int(v) for v in raw_labels], dtype=np.int64)
    else:
        class_names = sorted(set(raw_labels))
        index = {c: i for i, c in enumerate(class_names)}
        y = np.array([index[v] for v in raw_labels], dtype=np.int64)
    paths, tags = [], []
    for line, r in enumerate(rows, start=2):
        if not r["path"]:
            raise DataError(f"{manifest}:{line}: empty path")
        p = (root / r["path"]).resolve()
        if root != p and root not in p.parents:
            raise DataError(f"{manifest}:{line}: path {r['path']!r} escapes the manifest's folder {root}; refused")
        if not p.is_file():
            raise DataError(f"{manifest}:{line}: image not found: {p}")
        paths.append(p)
        if "split" in r and r["split"]:
            tag = _SPLIT_ALIASES.get(r["split"].lower())
            if tag is None:
                raise DataError(f"{manifest}:{line}: unknown split {r['split']!r} (use train/val/test)")
            tags.append(tag)
        else:
            tags.append(None)
    has_split = any(t is not None for t in tags)
    if has_split and any(t is None for t in tags):
        raise DataError(f"{manifest}: the split column is filled for some rows only")
    return ImageSource(
        description=str(manifest), labels=y, class_names=class_names, channels=_probe_channels(paths),
        native_size=_probe_size(paths), split_tags=np.array(tags) if has_split else None,
        fingerprint=_fingerprint([str(p.relative_to(root)) for p in paths], y, root), _paths=paths,
    )


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


def open_source(name: str, fmt: str = "auto", download: bool = False) -> ImageSource:
    """Dispatch on ``fmt`` (or guess it from ``name``)."""
    p = Path(name).expanduser()
    if fmt == "auto":
        if p.suffix == ".npz" or medmnist.is_medmnist_name(name):
            fmt = "medmnist"
        elif p.suffix.lower() == ".csv":
            fmt = "csv"
        elif p.is_dir():
            fmt = "folder"
        else:
            # A bare folder name may live in the data directories.
            for d in medmnist.search_dirs():
                if (d / name).is_dir():
                    return from_folder(d / name)
                if (d / name).with_suffix(".csv").is_file():
                    return from_csv((d / name).with_suffix(".csv"))
            raise DataError(
                f"dataset {name!r} not found: not a MedMNIST name ({', '.join(medmnist.FLAVOURS)}), "
                f"not a .npz/.csv file and not a folder; also looked in {[str(d) for d in medmnist.search_dirs()]}"
            )
    if fmt == "medmnist":
        return from_medmnist(name, download=download)
    if fmt == "csv":
        return from_csv(p)
    return from_folder(p)
