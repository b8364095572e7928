"""data.resident: batches gathered and augmented on the device match the per-image pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_engine, tiny_cfg, write_npz

from medistill.config import load_config
from medistill.data import build_data
from medistill.data.transforms import apply_view
from medistill.errors import DataError


def _bundle(tmp_path, augment: str = "dihedral", size: int | None = None):
    npz = write_npz(tmp_path / "d.npz", counts=(30, 20, 10))
    b = build_data(load_config(None, [("data.name", str(npz)), ("data.augment", augment), ("data.resident", "on")]).data,
                   image_size=size)
    return b


@pytest.mark.parametrize("size", [None, 24])
def test_resident_batches_equal_the_per_image_pipeline(tmp_path, size):
    b = _bundle(tmp_path, size=size)
    loader = b.loader("train", 16, train=True, seed=3)
    seen, views = [], set()
    ref = b.dataset("train", train=False)          # unaugmented items, resized the same way
    pos = {int(i): k for k, i in enumerate(ref.indices)}
    for x, y, idx, v in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, b.image_size, b.image_size)
        for j in range(len(idx)):
            base, label, _, _ = ref[pos[int(idx[j])]]
            assert torch.allclose(x[j], apply_view(base, int(v[j])), atol=1e-5)
            assert int(y[j]) == label
        seen += idx.tolist()
        views |= set(v.tolist())
    assert sorted(seen) == sorted(b.splits["train"].tolist())       # every image once per epoch
    assert views <= set(range(8)) and len(views) > 1
    assert len(loader) == len(list(iter(loader)))


def test_resident_options_and_refusals(tmp_path):
    b = _bundle(tmp_path, augment="flip")
    n = len(b.splits["train"])
    dl = b.loader("train", 16, train=True, drop_last=True)
    assert len(dl) == n // 16 and all(len(batch[2]) == 16 for batch in dl)
    assert {int(v) for batch in dl for v in batch[3]} <= {0, 4}
    bal = b.loader("train", 16, train=True, balanced=True)
    labels = torch.cat([batch[1] for batch in bal])
    assert len(labels) == n and torch.bincount(labels).min() > 0
    with pytest.raises(DataError, match="finite view sets"):
        _bundle(tmp_path, augment="standard").loader("train", 8, train=True)
    folder = tmp_path / "imgs"
    from PIL import Image

    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(folder / c / f"{i}.png")
    fb = build_data(load_config(None, [("data.name", str(folder)), ("data.resident", "on")]).data)
    with pytest.raises(DataError, match="in-memory dataset"):
        fb.loader("train", 8, train=True)


def test_resident_training_run_with_cached_teacher(tmp_path):
    npz = write_npz(tmp_path / "d.npz")
    teacher = tiny_cfg(npz, tmp_path / "t", epochs=1)
    run_engine(teacher)
    cfg = tiny_cfg(npz, tmp_path / "s", epochs=2)
    cfg["data"].update(augment="dihedral", resident="on")
    cfg["teachers"] = [{"name": "t", "checkpoint": str(tmp_path / "t")}]
    cfg["terms"] = [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9}]
    eng = run_engine(cfg)
    assert "t" in eng.cache                         # views stay enumerable: the teacher is cached
    log = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[-1]["train"]["student"]["kd"] > 0


def test_resident_auto_is_off_on_cpu_and_bools_are_accepted(tmp_path):
    from torch.utils.data import DataLoader

    npz = write_npz(tmp_path / "d.npz")
    b = build_data(load_config(None, [("data.name", str(npz))]).data)
    assert b.cfg.resident == "auto" and not b.use_resident()
    assert isinstance(b.loader("train", 8, train=True), DataLoader)
    assert load_config(None, [("data.resident", True)]).data.resident == "on"
    assert load_config(None, ["data.resident=false"]).data.resident == "off"
