"""Lists of image files: paths made lazily, a fingerprint from their names and stat, and the
channels and size their first headers show (folders, CSV manifests and unlabelled pools share them)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import numpy as np
from PIL import Image, UnidentifiedImageError

from medistill.data.imageio import DICOM_SUFFIXES, dicom_header

_GRAY_MODES = {"L", "I;16", "I;16B", "I;16L", "I", "F", "1"}


def probe_channels(paths: Sequence[Path], sample: int = 64) -> tuple[int, list[str]]:
    """1 if the sampled readable images are all single-channel, else 3; and a note when grey and
    colour images are mixed (all are then read as RGB). The sample is spread over the whole list
    (header reads only), not its first files: those are one class's, which may be the grey one."""
    seen: dict[str, Path] = {}   # "gray"/"colour" → an example file
    for i in np.unique(np.linspace(0, len(paths) - 1, min(len(paths), sample)).astype(int)):
        p = paths[i]
        if p.suffix.lower() in DICOM_SUFFIXES:
            seen.setdefault("gray" if dicom_header(p)["channels"] == 1 else "colour", p)
            continue
        try:
            with Image.open(p) as img:
                seen.setdefault("gray" if img.mode in _GRAY_MODES else "colour", p)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            continue   # read_image names the file when the image is needed
    if len(seen) == 2:
        return 3, [f"the images mix grey and colour (e.g. grey {seen['gray']}, colour {seen['colour']}): every image "
                   "is read as 3-channel RGB, grey ones repeated over the channels"]
    return (1 if "gray" in seen else 3), []


def probe_size(paths: Sequence[Path]) -> int | None:
    sizes = set()
    for p in paths[:16]:
        if p.suffix.lower() in DICOM_SUFFIXES:
            h = dicom_header(p)
            sizes.add((h["columns"], h["rows"]))
            continue
        try:
            with Image.open(p) as img:
                sizes.add(img.size)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            continue
    if len(sizes) == 1:
        w, h = sizes.pop()
        if w == h:
            return w
    return None


class PathList(Sequence[Path]):
    """``root / rel[i]`` made when item ``i`` is read: building a ``Path`` for every file of a
    16k-image folder took 0.1 s of every start, and a run reads one path per image it loads."""

    def __init__(self, root: Path, rel: list[str]):
        self.root, self.rel = str(root), rel

    def __len__(self) -> int:
        return len(self.rel)

    @overload
    def __getitem__(self, i: int) -> Path: ...
    @overload
    def __getitem__(self, i: slice) -> list[Path]: ...

    def __getitem__(self, i: int | slice) -> Path | list[Path]:
        if isinstance(i, slice):
            return [Path(self.root, r) for r in self.rel[i]]
        return Path(self.root, self.rel[i])


def fingerprint(rel_paths: list[str], labels: np.ndarray, root: Path, ns: bool = False) -> str:
    """A hash of every file's relative path, label, size and modification time (whole seconds;
    nanoseconds with ``ns``, which sees a file replaced within the same second — the unlabelled
    pool's identity uses it; the labelled data's keeps seconds so saved runs stay valid)."""
    h = hashlib.sha256()
    base = str(root)
    for rp, y in zip(rel_paths, labels.tolist()):
        st = os.stat(os.path.join(base, rp))   # strings: a Path per file cost 0.1 s per 16k files
        stamp = st.st_mtime_ns if ns else int(st.st_mtime)
        h.update(f"{rp}\0{y}\0{st.st_size}\0{stamp}\n".encode())
    return h.hexdigest()
