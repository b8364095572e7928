"""Bad inputs get clear errors and nothing already written is damaged (docs/reliability.md)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_engine, tiny_cfg, write_npz
from medistill.config import DataConfig
from medistill.data import build_data
from medistill.errors import DataError, MedistillError, ModelError, NonFiniteLossError
from medistill.io import write_json


def test_full_disk_keeps_previous_checkpoint(tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medistill.distill.engine import Engine

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_npz, out, epochs=2)
    step = Engine._step

    def interrupted(self, batch, epoch: int, i: int):
        if epoch == 1:
            raise KeyboardInterrupt("stopped after epoch 0")
        return step(self, batch, epoch, i)

    monkeypatch.setattr(Engine, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_engine(cfg)
    monkeypatch.setattr(Engine, "_step", step)
    before = (out / "checkpoint_last.pt").read_bytes()
    split_before = (out / "split.json").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(MedistillError, match="No space left on device"):
        run_engine(cfg, resume=True)
    assert (out / "checkpoint_last.pt").read_bytes() == before
    assert (out / "split.json").read_bytes() == split_before
    assert not list(out.glob(".*.tmp"))


def test_atomic_json_failure_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "m.json"
    write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}


def test_nan_input_stops_clearly(tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medistill.data.dataset import ImageDataset

    orig = ImageDataset.__getitem__

    def nan_item(self, k):
        x, y, i, v = orig(self, k)
        return x * float("nan"), y, i, v

    monkeypatch.setattr(ImageDataset, "__getitem__", nan_item)
    with pytest.raises(NonFiniteLossError, match="NaN/Inf pixel"):
        run_engine(tiny_cfg(tiny_npz, tmp_path / "run"))


def test_truncated_and_mistyped_images(tmp_path: Path) -> None:
    root = tmp_path / "f"
    for c in "ab":
        (root / c).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(np.full((20, 20, 3), 60 * k, np.uint8)).save(root / c / f"{k}.jpg", quality=95)
    data = (root / "a" / "1.jpg").read_bytes()
    (root / "a" / "1.jpg").write_bytes(data[: len(data) // 3])
    (root / "b" / "2.jpg").write_text("this is text, not an image")
    b = build_data(DataConfig(name=str(root), val_fraction=0.25, test_fraction=0.25))
    errors = []
    for split in ("train", "val", "test"):
        ds = b.dataset(split, False)
        for k in range(len(ds)):
            try:
                ds[k]
            except DataError as e:
                errors.append(str(e))
    assert len(errors) == 2 and any("1.jpg" in e for e in errors) and any("2.jpg" in e for e in errors)


def test_empty_split(tiny_npz: Path, tmp_path: Path) -> None:
    root = tmp_path / "f"
    for c in "ab":
        (root / c).mkdir(parents=True)
        for k in range(5):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / c / f"{k}.png")
    with pytest.raises(DataError, match="val split .* is empty"):
        build_data(DataConfig(name=str(root), val_fraction=0.0, test_fraction=0.2))


def test_incompatible_teacher_checkpoint(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad_teacher"
    shutil.copytree(teachers[0] / "students" / "t", bad)
    spec = json.loads((bad / "model.json").read_text())
    spec["kwargs"] = {"widths": [16, 16, 16, 16, 16]}
    (bad / "model.json").write_text(json.dumps(spec))
    cfg = tiny_cfg(data_dir / "tiny.npz", tmp_path / "run")
    cfg["teachers"] = [{"name": "t", "checkpoint": str(bad)}]
    cfg["terms"] = [{"type": "kd"}]
    with pytest.raises(ModelError, match="incompatible"):
        run_engine(cfg)


def test_negative_label_npz(tmp_path: Path) -> None:
    p = write_npz(tmp_path / "d.npz")
    z = dict(np.load(p))
    z["train_labels"] = z["train_labels"].astype(np.int64)
    z["train_labels"][0] = -1
    np.savez(p, **z)
    with pytest.raises(DataError, match="negative label"):
        build_data(DataConfig(name=str(p)))
