"""Checks every data format applies at load: image arrays, label arrays, class ids, and the
class names an ``.npz`` may carry, and the notes a run prints about its splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medistill.data import medmnist
from medistill.errors import DataError


def check_images(im: np.ndarray, where: str) -> np.ndarray:
    """``[N, H, W]`` or ``[N, H, W, C]`` uint8 with C in (1, 3); a channels-first array is named as such."""
    if im.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 in 0…255, got {im.dtype}"
                        + (" (scale floats in [0, 1] by 255 and convert)" if np.issubdtype(im.dtype, np.floating) else ""))
    if im.ndim == 3:
        im = im[..., None]
    if im.ndim != 4:
        raise DataError(f"{where}: expected [N, H, W] or [N, H, W, C] images, got shape {im.shape}")
    if im.shape[-1] not in (1, 3):
        if im.shape[1] in (1, 3):
            raise DataError(f"{where}: shape {im.shape} looks channels-first [N, C, H, W]; medistill reads "
                            "[N, H, W, C] (np.moveaxis(images, 1, -1))")
        raise DataError(f"{where}: images have {im.shape[-1]} channels; 1 (grey) or 3 (RGB) are supported")
    return im


def check_labels(raw: np.ndarray, n_images: int, where: str) -> np.ndarray:
    """Integer class ids ``[N]`` from ``[N]`` or ``[N, 1]``; floats only when integral."""
    y = np.asarray(raw)
    if y.ndim == 0:
        raise DataError(f"{where}: a single value ({y.item()!r}), not one label per image; save an array of {n_images} labels")
    if y.ndim == 2 and y.shape[1] != 1:
        raise DataError(f"{where}: shape {y.shape} looks multi-label; medistill handles one label per image")
    y = y.reshape(-1)
    if len(y) != n_images:
        raise DataError(f"{where}: {len(y)} labels for {n_images} images")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            bad = y[~np.isfinite(y) | (y != np.round(y))][0]
            raise DataError(f"{where}: label {bad} is not a whole number; labels must be integer class ids")
    elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise DataError(f"{where}: labels must be integer class ids, got {y.dtype}")
    return y.astype(np.int64)


def check_label_range(y: np.ndarray, where: str) -> int:
    """Class ids must be 0…K−1 with every class present: a stray id (250 among grades 0–4)
    would otherwise make a 251-class model."""
    if len(y) == 0:
        raise DataError(f"{where}: no labelled images")
    if y.min() < 0:
        raise DataError(f"{where}: negative label {int(y.min())}")
    k = int(y.max()) + 1
    present = np.bincount(y, minlength=k) > 0
    if not present.all():
        missing = np.flatnonzero(~present)
        raise DataError(f"{where}: label {k - 1} implies {k} classes but {len(missing)} of them have no image "
                        f"(e.g. {int(missing[0])}); class ids must run 0…K−1 — is {k - 1} a typo?")
    return k


def npz_class_names(arrays: dict[str, np.ndarray], path: Path, n_classes: int) -> list[str]:
    """The file's own ``class_names`` string array when it has one (read without pickle), else
    the MedMNIST table's names, else the label ids."""
    if "class_names" not in arrays:
        return medmnist.class_names(str(path), n_classes)
    names = arrays["class_names"]
    if names.dtype.kind not in "US" or names.ndim != 1:
        raise DataError(f"{path}: class_names must be a 1-D array of strings, got {names.dtype} {names.shape}")
    out = [str(n.decode() if isinstance(n, bytes) else n).strip() for n in names]
    if len(out) < n_classes:
        raise DataError(f"{path}: class_names holds {len(out)} names but the labels go up to {n_classes - 1}")
    if len(set(out)) != len(out) or not all(out):
        raise DataError(f"{path}: class_names must be distinct and non-empty, got {out}")
    return out


def missing_eval_classes(source: Any, splits: dict[str, np.ndarray], notes: list[str]) -> None:
    """Say so when a class has no validation or test image: its recall is undefined there, and
    balanced accuracy and macro-F1 average over the classes present only."""
    for k in ("val", "test"):
        missing = [source.class_names[c] for c in np.setdiff1d(np.arange(source.num_classes),
                                                                source.labels[splits[k]])]
        if missing:
            notes.append(f"class(es) {missing} have no {k} image: balanced accuracy and macro-F1 on {k} average over "
                         f"the other {source.num_classes - len(missing)} classes; move some of their images to {k} "
                         "(or change data.val_fraction / data.test_fraction)")


def shape_note(source: Any, splits: dict[str, np.ndarray], notes: list[str]) -> None:
    """Say so when the images are not square: every model squashes them to a square."""
    first = int(splits["train"][0])
    h, w = source.load(first).shape[:2]
    if h != w:
        notes.append(f"images are not square (e.g. {w}×{h} px: {source.path(first)}): each is resized to a square, "
                     "which changes its aspect ratio; crop or pad them first to keep it")
