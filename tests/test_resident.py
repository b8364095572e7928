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
    cache = eng.cache["t"]
    assert cache.positions.device == eng.device and cache.outputs["logits"].device == eng.device
    train = torch.as_tensor(eng.data.splits["train"][:4])
    got = cache.lookup(train, torch.tensor([0, 3, 7, 5]))["logits"]
    assert torch.equal(got[1], cache.outputs["logits"][3, cache.positions[train[1]]])
    from medistill.errors import CacheMismatchError

    with pytest.raises(CacheMismatchError, match="no entry"):
        cache.lookup(train, torch.tensor([0, 3, 9, 5]))       # a view id beyond the cached set
    with pytest.raises(CacheMismatchError, match="no entry"):
        cache.lookup(torch.as_tensor(eng.data.splits["test"][:2]), torch.tensor([0, 0]))
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


def test_crop_flip_batch_identity_flip_and_torchvision_crop():
    from torchvision.transforms.v2 import functional as TF

    from medistill.data.transforms import crop_flip_batch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 16, 16, generator=g)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    assert torch.allclose(crop_flip_batch(x, full, torch.zeros(3, dtype=torch.bool)), x, atol=1e-5)
    flips = torch.tensor([True, False, True])
    got = crop_flip_batch(x, full, flips)
    assert torch.allclose(got[0], x[0].flip(-1), atol=1e-5) and torch.allclose(got[1], x[1], atol=1e-5)
    # an integer box (left 2, top 3, 8 × 10 px) against torchvision's crop-then-resize; the
    # border row/column differs by design (it reads the pixel beyond the crop edge)
    box = torch.tensor([[2 / 16, 3 / 16, 8 / 16, 10 / 16]] * 3)
    ours = crop_flip_batch(x, box, torch.zeros(3, dtype=torch.bool))
    ref = TF.resized_crop(x, top=3, left=2, height=10, width=8, size=[16, 16], antialias=False)
    assert torch.allclose(ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)


def test_resident_standard_augmentation_matches_the_per_image_statistics(tmp_path):
    """``standard`` on the device: seeded, one random crop and flip per sample (view id −1),
    with the same per-pixel mean and spread as torchvision's RandomResizedCrop + flip."""
    from medistill.data.resident import ResidentLoader
    from medistill.data.transforms import Augment

    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    img = torch.stack([xx * 16, yy * 16, (xx + yy) * 8]).clamp(max=255).to(torch.uint8)   # ramps: crops show
    n = 3000
    images = img[None].expand(n, -1, -1, -1).contiguous()
    labels = torch.zeros(n, dtype=torch.long)

    def epoch(seed: int) -> torch.Tensor:
        dl = ResidentLoader(images, labels, np.arange(n), 16, 500, "standard", seed, shuffle=True)
        batches = list(dl)
        assert all((b[3] == -1).all() for b in batches)
        return torch.cat([b[0] for b in batches])

    ours = epoch(1)
    assert torch.equal(ours, epoch(1)) and not torch.equal(ours, epoch(2))
    torch.manual_seed(0)
    aug = Augment("standard", 16)
    base = img.float() / 255
    ref = torch.stack([aug(base)[0] for _ in range(n)])
    assert (ours.mean(0) - ref.mean(0)).abs().max() < 0.03
    assert (ours.std(0) - ref.std(0)).abs().max() < 0.03
    flipped = lambda t: (t[:, 0, :, 0] > t[:, 0, :, -1]).float().mean()   # noqa: E731 — ramp reversed
    assert abs(float(flipped(ours)) - float(flipped(ref))) < 0.04


def test_resident_standard_run_cached_on_fixed_crops_or_live(tmp_path):
    """A distillation run with random crops on the device: with the cache (default) the resident
    loader draws among the fixed crops the cache was built on, and the cached rows equal the live
    teacher on the loader's batch; with the cache off the teacher runs on fresh random crops."""
    npz = write_npz(tmp_path / "d.npz")
    run_engine(tiny_cfg(npz, tmp_path / "t", epochs=1))
    cfg = tiny_cfg(npz, tmp_path / "s", epochs=1)
    cfg["data"].update(augment="standard", resident="on")
    cfg["train"]["teacher_amp"] = "off"   # the cached rows are compared with an fp32 forward below
    cfg["teachers"] = [{"name": "t", "checkpoint": str(tmp_path / "t")}]
    cfg["terms"] = [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9}]
    eng = run_engine(cfg)
    loader = eng.data.loader("train", 8, train=True)
    assert "t" in eng.cache and type(loader).__name__ == "ResidentLoader"
    x, _y, idx, view = next(iter(loader))
    assert bool((view >= 8).all())
    with torch.no_grad():
        live = eng.teachers[0].logits(x)
    assert torch.allclose(eng.cache["t"].lookup(idx, view)["logits"], live, atol=1e-5)
    cfg["out"] = str(tmp_path / "s2")
    cfg["train"]["teacher_cache"] = "off"
    eng = run_engine(cfg)
    assert eng.cache == {} and set(next(iter(eng.data.loader("train", 8, train=True)))[3].tolist()) == {-1}


def test_loader_worker_defaults_per_device(tmp_path):
    """data.num_workers=auto: on a CPU device no workers for an in-memory array and one for image
    files, some beside a GPU (pinned, persistent, prefetching); an explicit count wins; a
    negative one is refused."""
    import os

    from medistill.errors import ConfigError

    npz = write_npz(tmp_path / "d.npz")
    b = build_data(load_config(None, [("data.name", str(npz))]).data)
    assert b.cfg.num_workers == "auto" and b.workers() == {"num_workers": 0, "pin_memory": False}
    b.device, b.pin_memory = torch.device("cuda"), True          # how the engine configures a GPU run
    w = b.workers()
    assert w["num_workers"] == min(8, max(1, (os.cpu_count() or 2) // 2)) and w["pin_memory"]
    assert w["persistent_workers"] and w["prefetch_factor"] == 2
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "folder" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "folder" / c / f"{i}.png")
    files = build_data(load_config(None, [("data.name", str(tmp_path / "folder"))]).data)
    assert files.workers()["num_workers"] == 1 and files.workers()["persistent_workers"]
    b2 = build_data(load_config(None, [("data.name", str(npz)), ("data.num_workers", 1), ("data.prefetch_factor", 4)]).data)
    dl = b2.loader("train", 8, train=True)
    assert dl.num_workers == 1 and dl.prefetch_factor == 4 and len(list(dl)) == len(dl)
    with pytest.raises(ConfigError, match="num_workers"):
        load_config(None, ["data.num_workers=-1"])
