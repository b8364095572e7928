"""Reading one image file as uint8 ``[H, W, C]``: PIL formats (8- and 16-bit) and DICOM.

High-bit-depth pixels (16-bit PNG/TIFF, DICOM) are *windowed* to 8 bits rather than divided by
their type's maximum, which leaves a 12-bit CT or X-ray almost black:

* DICOM: pixel values go through the modality LUT (Rescale Slope/Intercept, by pydicom), then
  the configured window, else the file's Window Center/Width, else the image's own range;
  MONOCHROME1 (bright = low values) is inverted so that every image reads bright-is-high.
* 16-bit PNG/TIFF: the configured window, else the image's own range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from medistill.errors import DataError

DICOM_SUFFIXES = {".dcm", ".dicom"}
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def window_to_unit(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear VOI window (PS3.3 C.11.2.1.2) mapped to [0, 1]. Written here rather than
    through pydicom's ``apply_voi_lut`` because that keeps the input's value range, and a
    configured window must apply to PNG/TIFF pixels as well."""
    if width < 1:
        raise DataError(f"window width must be ≥ 1, got {width}")
    return np.clip((arr - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)


def _auto_window(arr: np.ndarray) -> tuple[float, float]:
    """The window spanning the image's own range (a flat image maps to mid-grey)."""
    lo, hi = float(arr.min()), float(arr.max())
    return (lo + hi + 1) / 2, max(hi - lo + 1, 1.0)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(unit * 255.0).astype(np.uint8)


def pil_to_array(img: Image.Image, channels: int, window: Sequence[float] | None = None) -> np.ndarray:
    """Any PIL mode (L, RGB, RGBA, P, I;16, I, F) → uint8 ``[H, W, channels]``; high-bit-depth
    grey images are windowed (``window`` = (center, width), default: the image's range)."""
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("image holds NaN/Inf values")
        if window is not None:
            arr8 = _to_uint8(window_to_unit(arr, *window))
        elif img.mode == "F" and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr8 = _to_uint8(arr)                  # a float image in [0, 1]
        elif img.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 255:
            arr8 = arr.astype(np.uint8)            # 8-bit values stored in 32-bit integers
        else:
            arr8 = _to_uint8(window_to_unit(arr, *_auto_window(arr)))
        img = Image.fromarray(arr8, mode="L")
    img = img.convert("L" if channels == 1 else "RGB")
    out = np.asarray(img, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def _first(v: object) -> float:
    """Window tags may be multi-valued (several windows); the first is the default one."""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return float(v[0])  # type: ignore[index]
    return float(v)  # type: ignore[arg-type]


def read_dicom(path: str | Path, channels: int, window: Sequence[float] | None = None,
               frame: int | None = None) -> np.ndarray:
    """A DICOM file as uint8 ``[H, W, channels]`` (see the module docstring). Multi-frame files
    need ``frame`` (``data.dicom_frame``); files without pixel data, with a transfer syntax no
    installed decoder handles, or otherwise unreadable raise :class:`DataError` naming the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError) as e:
        raise DataError(f"corrupt or unreadable DICOM file {path}: {e}") from e
    if "PixelData" not in ds:
        raise DataError(f"DICOM file {path} holds no pixel data (a report or structured document?)")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1 and frame is None:
        raise DataError(f"DICOM file {path} holds {n_frames} frames; choose one with data.dicom_frame=N "
                        "(medistill classifies single images)")
    if frame is not None and not 0 <= frame < n_frames:
        raise DataError(f"data.dicom_frame={frame} but {path} holds {n_frames} frame(s)")
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises several types for missing decoders
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", ts)
        raise DataError(f"cannot decode the pixels of DICOM file {path} (transfer syntax {name}): {e}. "
                        "Compressed DICOM needs a decoder plugin (pylibjpeg, gdcm) or decompressing first") from e
    if n_frames > 1:
        arr = arr[frame]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "RGB":
        rgb = arr if arr.dtype == np.uint8 else _to_uint8(window_to_unit(arr.astype(np.float64), *_auto_window(arr)))
        img = Image.fromarray(rgb, mode="RGB")
    elif photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        if window is not None:
            c, w = window
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        else:
            c, w = _auto_window(values)
        unit = window_to_unit(values, c, w)
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        img = Image.fromarray(_to_uint8(unit), mode="L")
    else:
        raise DataError(f"DICOM file {path}: photometric interpretation {photometric} is not supported "
                        "(MONOCHROME1, MONOCHROME2, RGB)")
    out = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def dicom_header(path: str | Path) -> dict[str, object]:
    """Size, channels and patient id of a DICOM file, read without its pixels."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise DataError(f"corrupt or unreadable DICOM file {path}: {e}") from e
    return {"rows": getattr(ds, "Rows", None), "columns": getattr(ds, "Columns", None),
            "channels": int(getattr(ds, "SamplesPerPixel", 1) or 1), "patient_id": str(getattr(ds, "PatientID", "") or "")}


def read_image(path: str | Path, channels: int, window: Sequence[float] | None = None,
               frame: int | None = None, min_side: int | None = None) -> np.ndarray:
    """Any supported image file as uint8 ``[H, W, channels]``; unreadable files raise
    :class:`DataError` naming them. ``min_side``: the side the caller will resize to — a JPEG is
    then decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides ≥ it (libjpeg's
    reduced DCT decode, PIL ``draft``): a 512-px file read for 224-px training decodes at 256 px,
    ~4× fewer pixels, before the same antialiased resize."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(p, channels, window, frame)
    try:
        with Image.open(p) as img:
            if min_side and img.format == "JPEG" and min(img.size) >= 2 * min_side:
                img.draft("L" if channels == 1 else "RGB", (min_side, min_side))
            img.load()
            return pil_to_array(img, channels, window)
    except Image.DecompressionBombError as e:
        raise DataError(f"image {p} declares a size beyond PIL's safety limit (decompression bomb?): {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {p}: {e}") from e
