"""DICOM and high-bit-depth images: files generated here (MONOCHROME1/2, 8/12/16-bit, with and
without window tags, rescale slope/intercept) read to arrays computed from the DICOM standard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from medistill.config import load_config  # noqa: E402
from medistill.data import build_data  # noqa: E402
from medistill.data.imageio import read_image  # noqa: E402
from medistill.errors import DataError  # noqa: E402


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                slope: float | None = None, intercept: float | None = None, window: tuple[float, float] | None = None,
                patient: str = "P1", transfer_syntax: str = ExplicitVRLittleEndian, pixel_data: bool = True) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def expected_window(values: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2, piecewise, into 0…255."""
    out = np.empty(values.shape)
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    for i, x in np.ndenumerate(values):
        out[i] = 0.0 if x <= lo else 255.0 if x > hi else ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return np.round(out).astype(np.uint8)


def ramp(dtype: type, hi: int, shape: tuple[int, int] = (6, 5)) -> np.ndarray:
    return np.linspace(0, hi, shape[0] * shape[1]).round().astype(dtype).reshape(shape)


def test_12_bit_with_window_tags_and_rescale(tmp_path):
    px = ramp(np.uint16, 4095)
    f = write_dicom(tmp_path / "a.dcm", px, slope=2.0, intercept=-1024.0, window=(40.0, 400.0))
    got = read_image(f, 1)
    assert got.shape == (6, 5, 1) and got.dtype == np.uint8
    assert np.array_equal(got[..., 0], expected_window(px * 2.0 - 1024.0, 40.0, 400.0))


def test_monochrome1_without_window_uses_its_range_inverted(tmp_path):
    px = ramp(np.uint16, 1000)
    f = write_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1")
    got = read_image(f, 1)[..., 0]
    lo, hi = 0.0, 1000.0
    exp = 255 - expected_window(px.astype(float), (lo + hi + 1) / 2, hi - lo + 1)
    assert np.abs(got.astype(int) - exp.astype(int)).max() <= 1
    assert got[0, 0] == 255 and got[-1, -1] == 0        # low values are bright in MONOCHROME1


def test_8_bit_and_16_bit_and_configured_window(tmp_path):
    px8 = ramp(np.uint8, 200)
    got = read_image(write_dicom(tmp_path / "b.dcm", px8, bits_stored=8), 3)
    assert got.shape == (6, 5, 3) and got[0, 0, 0] == 0 and got[-1, -1, 0] == 255
    px16 = ramp(np.uint16, 65535)
    f = write_dicom(tmp_path / "c.dcm", px16, bits_stored=16, window=(1000.0, 100.0))
    assert np.array_equal(read_image(f, 1)[..., 0], expected_window(px16.astype(float), 1000.0, 100.0))
    # a configured window wins over the file's
    assert np.array_equal(read_image(f, 1, window=(30000.0, 20000.0))[..., 0],
                          expected_window(px16.astype(float), 30000.0, 20000.0))


def test_16_bit_png_is_windowed_not_darkened(tmp_path):
    px = ramp(np.uint16, 4095)
    f = tmp_path / "x.png"
    Image.fromarray(px).save(f)
    got = read_image(f, 1)[..., 0]
    assert got.max() == 255 and got.min() == 0           # a 12-bit image fills the 8-bit range
    assert np.array_equal(read_image(f, 1, window=(2048.0, 1024.0))[..., 0], expected_window(px.astype(float), 2048.0, 1024.0))


def test_bad_dicom_files_are_named(tmp_path):
    with pytest.raises(DataError, match="holds no pixel data"):
        read_image(write_dicom(tmp_path / "np.dcm", ramp(np.uint16, 9), pixel_data=False), 1)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 4)
    with pytest.raises(DataError, match="junk.dcm"):
        read_image(junk, 1)
    multi = write_dicom(tmp_path / "mf.dcm", np.stack([ramp(np.uint16, 100), ramp(np.uint16, 4000)]))
    with pytest.raises(DataError, match="2 frames; choose one with data.dicom_frame"):
        read_image(multi, 1)
    assert read_image(multi, 1, frame=1)[-1, -1, 0] == 255
    with pytest.raises(DataError, match="dicom_frame=5"):
        read_image(multi, 1, frame=5)
    from pydicom.encaps import encapsulate

    jp = write_dicom(tmp_path / "j2k.dcm", ramp(np.uint16, 9), transfer_syntax="1.2.840.10008.1.2.4.90", pixel_data=False)
    ds = pydicom.dcmread(jp)
    ds.PixelData = encapsulate([b"\x00\x01garbage-not-jpeg2000"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(jp)
    with pytest.raises(DataError, match="cannot decode the pixels of DICOM file .*j2k.dcm"):
        read_image(jp, 1)


def test_dicom_folder_grouped_by_patient_id(tmp_path):
    root = tmp_path / "dicoms"
    for label in ("normal", "nodule"):
        (root / label).mkdir(parents=True)
    k = 0
    for p in range(16):
        for label in ("normal", "nodule"):
            for _ in range(2):
                px = ramp(np.uint16, 500 if label == "normal" else 3000, (8, 8))
                write_dicom(root / label / f"img{k}.dcm", px, patient=f"PAT{p:02d}")
                k += 1
    b = build_data(load_config(None, [("data.name", str(root)), ("data.group_by", "dicom_patient_id")]).data)
    assert b.channels == 1 and b.source.native_size == 8
    g = b.source.groups
    parts = [set(g[b.splits[s]]) for s in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    x = b.source.load(int(b.splits["train"][0]))
    assert x.shape == (8, 8, 1) and x.dtype == np.uint8
