"""Image sources: MedMNIST arrays, image folders and CSV manifests behind one interface.

A source knows how many images it has, their labels, an optional predefined split, and how
to load image ``i`` as a uint8 array ``[H, W, C]``. Folder and CSV images are read lazily
with PIL, only when a batch needs them.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from medistill.data import medmnist
from medistill.data.checks import check_images, check_label_range, check_labels, npz_class_names
from medistill.data.filelist import PathList, fingerprint, probe_channels, probe_size
from medistill.data.imageio import DICOM_SUFFIXES, dicom_header, pil_to_array, read_image
from medistill.errors import DataError

__all__ = ["ImageSource", "open_source", "pil_to_array"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES}
SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}


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
    groups: np.ndarray | None = None        # [N] patient/study ids (str) when the data names them
    window: tuple[float, float] | None = None   # (center, width) for high-bit-depth pixels; None: per file
    dicom_frame: int | None = None          # the frame read from multi-frame DICOM files
    _arrays: np.ndarray | None = None       # MedMNIST: [N, H, W, C] uint8
    _paths: Sequence[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # what opening it found (a run prints them)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        """Images held as one array (MedMNIST ``.npz``) rather than read from files."""
        return self._arrays is not None

    @property
    def array(self) -> np.ndarray:
        """The whole image array ``[N, H, W, C]`` uint8 of an in-memory source."""
        if self._arrays is None:
            raise DataError(f"{self.description} is read from files, not held as one array")
        return self._arrays

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def default_size(self) -> int:
        """The side a model sees when nothing asks for another: the images' own square size, else
        224 (timm's usual input) for images of mixed or non-square sizes."""
        return self.native_size or 224

    def load(self, i: int, min_side: int | None = None) -> np.ndarray:
        """Image ``i`` as uint8 ``[H, W, C]``; a corrupt file raises :class:`DataError` naming it.
        ``min_side``: the caller resizes to that side next, so a JPEG may be decoded smaller
        (:func:`read_image`)."""
        if self._arrays is not None:
            return self._arrays[i]
        return read_image(self._paths[i], self.channels, self.window, self.dicom_frame, min_side)

    def path(self, i: int) -> str:
        return str(self._paths[i]) if self._paths else f"{self.description}[{i}]"

    def groups_from_pattern(self, pattern: str) -> np.ndarray:
        """Group ids from the image file names: the first capture group of ``pattern`` (a regular
        expression searched in the name), or the whole match when it has none."""
        import re

        if not self._paths:
            raise DataError(f"data.group_pattern needs image files; {self.description} holds arrays")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise DataError(f"data.group_pattern {pattern!r} is not a valid regular expression: {e}") from None
        out = []
        for p in self._paths:
            m = rx.search(p.name)
            if m is None:
                raise DataError(f"data.group_pattern {pattern!r} does not match the file name {p.name!r} ({p})")
            out.append(m.group(1) if rx.groups else m.group(0))
        return np.array(out)

    def dicom_patient_ids(self) -> np.ndarray:
        """Group ids from the DICOM PatientID tag of every image (all must be DICOM and carry one)."""
        out = []
        for p in self._paths:
            if p.suffix.lower() not in DICOM_SUFFIXES:
                raise DataError(f"data.group_by=dicom_patient_id needs DICOM files; {p} is not one")
            pid = dicom_header(p)["patient_id"]
            if not pid:
                raise DataError(f"DICOM file {p} has no PatientID; it cannot be grouped by patient")
            out.append(pid)
        return np.array(out)


def from_medmnist(name: str, download: bool = False) -> ImageSource:
    path = medmnist.resolve(name, download=download)
    arrays = medmnist.load_npz(path)
    imgs, labels, tags = [], [], []
    for s in SPLIT_NAMES:
        im = arrays[f"{s}_images"]
        y = check_labels(arrays[f"{s}_labels"], len(im), f"{path}: {s}_labels")
        im = check_images(im, f"{path}: {s}_images")
        imgs.append(im)
        labels.append(y)
        tags.extend([s] * len(im))
    shapes = {s: im.shape[1:] for s, im in zip(SPLIT_NAMES, imgs)}
    if len(set(shapes.values())) > 1:
        shown = ", ".join(f"{s} {'×'.join(map(str, v))}" for s, v in shapes.items())
        raise DataError(f"{path}: the splits' images differ in size or channels ({shown}); "
                        "medistill needs one H×W×C for the whole file")
    images = np.concatenate(imgs)
    y = np.concatenate(labels)
    n_classes = check_label_range(y, str(path))
    return ImageSource(
        description=str(path), labels=y, class_names=npz_class_names(arrays, path, n_classes),
        channels=images.shape[-1], native_size=images.shape[1] if images.shape[1] == images.shape[2] else None,
        split_tags=np.array(tags), fingerprint=medmnist.md5_file(path), _arrays=images,
    )


def _scan(cdir: Path) -> tuple[list[str], list[str]]:
    """The image files under ``cdir`` (any depth) as paths relative to it, in pathlib's order
    (component by component: the order, and so the seeded split, of earlier runs), and the names
    of the non-image files directly in it. ``os.walk`` on strings: pathlib's ``rglob``, sorting
    and ``relative_to`` took ≈ 1 s of every start for 16k files (docs/benchmarks.md "scale")."""
    files, skipped = [], []
    for here, dirs, names in os.walk(cdir):
        sub = os.path.relpath(here, cdir)
        for n in names:
            if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES:
                files.append(n if sub == "." else os.path.join(sub, n))
            elif sub == ".":
                skipped.append(n)
    return sorted(files, key=lambda f: f.split(os.sep)), sorted(skipped)


def from_folder(root: str | Path) -> ImageSource:
    """``root/CLASS/*.png`` or ``root/{train,val,test}/CLASS/*.png``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    split_dirs: dict[str, Path] = {}
    for d in subdirs:
        if d.name.lower() in _SPLIT_ALIASES:
            key = _SPLIT_ALIASES[d.name.lower()]
            if key in split_dirs:
                raise DataError(f"{root} has both {split_dirs[key].name}/ and {d.name}/ (both mean the {key} split); "
                                "merge them or rename one")
            split_dirs[key] = d
    stray = [d.name for d in subdirs if d.name.lower() not in _SPLIT_ALIASES and not d.name.startswith(".")]
    if split_dirs and stray:
        raise DataError(f"{root} has split folders ({', '.join(sorted(d.name for d in split_dirs.values()))}) and also "
                        f"{', '.join(stray)}/ beside them; move class folders under train/val/test or remove them")
    layout = split_dirs if split_dirs else {None: root}
    class_names = sorted({c.name for base in layout.values() for c in base.iterdir() if c.is_dir()})
    if not class_names:
        raise DataError(f"{root}: no class sub-folders found (expected root/CLASS/image.png)")
    rel, labels, tags = [], [], []
    for split, base in layout.items():
        for ci, cname in enumerate(class_names):
            cdir = base / cname
            if not cdir.is_dir():
                continue
            files, skipped = _scan(cdir)
            if skipped:
                warnings.warn(f"{cdir}: ignored {len(skipped)} non-image file(s), e.g. {skipped[0]}", stacklevel=2)
            if not files and split is None:
                raise DataError(f"class folder {cdir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            prefix = os.path.relpath(cdir, root)
            rel.extend(os.path.join(prefix, f) for f in files)
            labels.extend([ci] * len(files))
            tags.extend([split] * len(files))
    if not rel:
        raise DataError(f"{root}: no images found")
    y = np.array(labels, dtype=np.int64)
    paths = PathList(root, rel)
    channels, notes = probe_channels(paths)
    return ImageSource(
        description=str(root), labels=y, class_names=class_names, channels=channels,
        native_size=probe_size(paths), split_tags=np.array(tags) if split_dirs else None,
        fingerprint=fingerprint(rel, y, root), _paths=paths, notes=notes,
    )


def _read_manifest(manifest: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of a CSV manifest (lower-cased keys, stripped cells) and its column names."""
    if not manifest.is_file():
        raise DataError(f"CSV manifest not found: {manifest}")
    # utf-8-sig: spreadsheet programs put a byte-order mark before the header
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "path" not in cols or "label" not in cols:
                raise DataError(f"{manifest}: header must contain 'path' and 'label' (got {reader.fieldnames})")
            rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    except UnicodeDecodeError as e:
        raise DataError(f"{manifest}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save the "
                        "manifest as UTF-8 (spreadsheets: 'CSV UTF-8')") from None
    except csv.Error as e:
        raise DataError(f"{manifest}: not a readable CSV file ({e})") from None
    if not rows:
        raise DataError(f"{manifest}: no rows")
    for key, what in (("label", "a label; every image needs its class"),
                      ("group", "a group; every image needs its patient/study id, or drop the group column")):
        empty = [i for i, r in enumerate(rows, start=2) if key in cols and not r.get(key)]
        if empty:
            raise DataError(f"{manifest}:{empty[0]}: empty {key} cell ({len(empty)} row(s) without {what})")
    return rows, cols


def _manifest_paths(manifest: Path, root: Path, rows: list[dict[str, str]]) -> tuple[list[Path], list[str | None]]:
    """Each row's image (inside the manifest's folder, present, listed once) and split tag."""
    paths: list[Path] = []
    tags: list[str | None] = []
    seen: dict[Path, int] = {}
    for line, r in enumerate(rows, start=2):
        if not r["path"]:
            raise DataError(f"{manifest}:{line}: empty path")
        p = (root / r["path"]).resolve()
        if root != p and root not in p.parents:
            raise DataError(f"{manifest}:{line}: path {r['path']!r} escapes the manifest's folder {root}; refused")
        if p in seen:
            _refuse_repeats(manifest, root, rows)
        seen[p] = line
        if not p.is_file():
            raise DataError(f"{manifest}:{line}: image not found: {p}")
        paths.append(p)
        tag = None
        if r.get("split"):
            tag = _SPLIT_ALIASES.get(r["split"].lower())
            if tag is None:
                raise DataError(f"{manifest}:{line}: unknown split {r['split']!r} (use train/val/test)")
        tags.append(tag)
    return paths, tags


def _refuse_repeats(manifest: Path, root: Path, rows: list[dict[str, str]]) -> None:
    """Every path a manifest lists more than once, as the audit reports copies: those under two
    labels are label conflicts (the same image, two diagnoses), named all together."""
    lines: dict[Path, list[int]] = {}
    for line, r in enumerate(rows, start=2):
        lines.setdefault((root / r["path"]).resolve(), []).append(line)
    repeated = {p: ls for p, ls in lines.items() if len(ls) > 1}
    labels = {p: [rows[n - 2].get("label", "") for n in ls] for p, ls in repeated.items()}
    conflicts = [p for p in repeated if len(set(labels[p])) > 1]

    def said(p: Path) -> str:
        return f"{p.relative_to(root)} (" + ", ".join(f"line {n}: {lab!r}" for n, lab in zip(repeated[p], labels[p])) + ")"

    if conflicts:
        raise DataError(f"{manifest}: label conflicts — {len(conflicts)} image(s) listed under two labels: "
                        + "; ".join(said(p) for p in conflicts[:10]) + ("; …" if len(conflicts) > 10 else "")
                        + ". The same image under two diagnoses is no label: decide each, and list each image once")
    raise DataError(f"{manifest}: {len(repeated)} image(s) listed more than once: "
                    + "; ".join(said(p) for p in list(repeated)[:10]) + ("; …" if len(repeated) > 10 else "")
                    + ". A repeated image can land in train and test at once — list each image once")


def from_csv(manifest: str | Path) -> ImageSource:
    """CSV with header ``path,label[,split][,group]``; paths are relative to the manifest's
    folder; ``group`` (patient or study id) keeps each group inside one split.

    Paths that escape that folder (``..``, absolute paths elsewhere, symlinks out) are refused.
    """
    manifest = Path(manifest)
    rows, cols = _read_manifest(manifest)
    root = manifest.parent.resolve()
    raw_labels = [r["label"] for r in rows]
    if all(_is_int(v) for v in raw_labels):
        y = np.array([int(v) for v in raw_labels], dtype=np.int64)
        class_names = [str(i) for i in range(check_label_range(y, str(manifest)))]
    else:
        class_names = sorted(set(raw_labels))
        index = {c: i for i, c in enumerate(class_names)}
        y = np.array([index[v] for v in raw_labels], dtype=np.int64)
    paths, tags = _manifest_paths(manifest, root, rows)
    has_split = any(t is not None for t in tags)
    if has_split and any(t is None for t in tags):
        raise DataError(f"{manifest}: the split column is filled for some rows only")
    groups = np.array([r["group"] for r in rows]) if "group" in cols else None
    channels, notes = probe_channels(paths)
    return ImageSource(
        description=str(manifest), labels=y, class_names=class_names, channels=channels,
        native_size=probe_size(paths), split_tags=np.array(tags) if has_split else None,
        fingerprint=fingerprint([str(p.relative_to(root)) for p in paths], y, root), groups=groups, _paths=paths,
        notes=notes,
    )


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class DataFormat:
    """A data format: how to recognise a dataset name and how to open it."""

    name: str
    matches: Callable[[str, Path], bool]
    open: Callable[[str, Path, bool], ImageSource]      # (name, path, download) → source


# The registry `data.format` chooses from; "auto" takes the first format whose `matches` holds.
# A new format is one reader above and one entry here.
FORMATS: dict[str, DataFormat] = {f.name: f for f in (
    DataFormat("medmnist", lambda n, p: p.suffix == ".npz" or medmnist.is_medmnist_name(n),
               lambda n, p, dl: from_medmnist(n, download=dl)),
    DataFormat("csv", lambda n, p: p.suffix.lower() == ".csv", lambda n, p, dl: from_csv(p)),
    DataFormat("folder", lambda n, p: p.is_dir(), lambda n, p, dl: from_folder(p)),
)}


def open_source(name: str, fmt: str = "auto", download: bool = False) -> ImageSource:
    """Open ``name`` with format ``fmt`` (a key of :data:`FORMATS`), or the first format that
    recognises it; a bare name is also looked up as a folder or CSV in the data directories."""
    p = Path(name).expanduser()
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"unknown data format {fmt!r}; formats: {', '.join(FORMATS)}")
        return FORMATS[fmt].open(name, p, download)
    if p.suffix.lower() == ".csv" and not p.exists() and len(p.parts) == 1:
        p = next((d / name for d in medmnist.search_dirs() if (d / name).is_file()), p)
    for f in FORMATS.values():
        if f.matches(name, p):
            return f.open(name, p, download)
    for d in medmnist.search_dirs():
        if (d / name).is_dir():
            return from_folder(d / name)
        if (d / name).with_suffix(".csv").is_file():
            return from_csv((d / name).with_suffix(".csv"))
    raise DataError(
        f"dataset {name!r} not found: not a MedMNIST name ({', '.join(medmnist.FLAVOURS)}), "
        f"not a .npz/.csv file and not a folder; also looked in {[str(d) for d in medmnist.search_dirs()]}"
    )
