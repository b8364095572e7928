"""Fourth round (#33, #34): fixed crops that make a teacher cacheable under the default
augmentation, byte-bounded batches, one decode per image when a cache is built; and the last
silent inputs — grey-then-colour folders, classes without test images, external classes in
another order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, write_npz
from medistill.config import load_config
from medistill.data import build_data
from medistill.data.resident import ResidentLoader
from medistill.data.sources import open_source
from medistill.data.transforms import FIXED_VIEW_BASE, Augment, FixedCrops, crop_flip_batch, resize


def test_fixed_crops_are_seeded_distinct_and_shared_by_both_loaders() -> None:
    a, b, c = FixedCrops(10, 3, seed=1), FixedCrops(10, 3, seed=1), FixedCrops(10, 3, seed=2)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flips, b.flips) and not torch.equal(a.boxes, c.boxes)
    assert a.views == [8, 9, 10] and a.boxes.shape == (10, 3, 4)
    # crop areas stay inside standard's range (80–100 % of the image)
    area = a.boxes[..., 2] * a.boxes[..., 3]
    assert bool((area > 0.75).all() and (area <= 1.0 + 1e-6).all())
    x = torch.rand(4, 3, 12, 12)
    idx, v = torch.tensor([0, 3, 3, 9]), torch.tensor([8, 8, 10, 9])
    want = crop_flip_batch(x, a.boxes[idx, v - FIXED_VIEW_BASE], a.flips[idx, v - FIXED_VIEW_BASE])
    assert torch.equal(a.apply(x, idx, v), want)
    # the per-image path (CPU loaders) gives the batched path's pixels (resident loader)
    aug = Augment("standard", 12, a)
    torch.manual_seed(0)
    one, view = aug(x[1], 3)
    assert view in a.views
    assert torch.allclose(one, a.apply(x[1:2], torch.tensor([3]), torch.tensor([view]))[0], atol=1e-6)
    # the resident loader draws among the same crops of the same images
    imgs = (torch.rand(10, 3, 12, 12) * 255).to(torch.uint8)
    rl = ResidentLoader(imgs, torch.zeros(10, dtype=torch.long), np.arange(10), 12, 5, "standard", seed=0,
                        shuffle=True, fixed=a)
    for xb, _y, ib, vb in rl:
        assert bool(((vb >= 8) & (vb <= 10)).all())
        ref = a.apply(resize(imgs[ib].float() / 255, 12), ib, vb)
        assert torch.allclose(xb, ref, atol=1e-6)


def test_evaluation_batches_are_bounded_by_bytes(tmp_path: Path) -> None:
    cfg = load_config(None, [("data.name", str(write_npz(tmp_path / "d.npz", size=16)))]).data
    bundle = build_data(cfg, image_size=512)
    # 3 × 512² × 4 bytes = 3 MiB per image: 256 MiB hold 85 images, 4 views 21
    assert bundle.eval_batch(256, 256) == 85 and bundle.eval_batch(256, 256, views=4) == 21
    assert bundle.eval_batch(16, 256) == 16 and bundle.eval_batch(256, 0.001) == 1
    assert build_data(cfg, image_size=224).eval_batch(256, 256) == 256


def test_a_cache_build_decodes_each_image_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medistill.data.sources import ImageSource

    cfg = load_config(None, [("data.name", str(write_npz(tmp_path / "d.npz", size=16)))]).data
    bundle = build_data(cfg)
    bundle.use_fixed_crops(4, 0)
    calls = {"n": 0}
    orig = ImageSource.load

    def counting(self, i, min_side=None):
        calls["n"] += 1
        return orig(self, i, min_side)

    monkeypatch.setattr(ImageSource, "load", counting)
    ds = bundle.dataset("train", train=False, views=[0, 4, *bundle.fixed_crops.views])
    x, _y, i, _v = ds[3]
    assert x.shape == (6, 3, 16, 16) and calls["n"] == 1
    plain = ds.source.load(i) / 255.0
    assert torch.allclose(x[0], torch.from_numpy(plain).permute(2, 0, 1).float(), atol=1e-6)
    assert torch.equal(x[1], x[0].flip(-1))


def _folder(root: Path, modes: dict[str, str], n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for cls, mode in modes.items():
        (root / cls).mkdir(parents=True)
        for k in range(n):
            arr = rng.integers(0, 255, size=(20, 20, 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(root / cls / f"{k}.png")
    return root


def test_grey_then_colour_folder_is_read_as_colour_with_a_note(tmp_path: Path) -> None:
    """The first 16 files (one class's) are grey; the next class is colour: formerly read as grey
    without a word, every colour image converted."""
    src = open_source(str(_folder(tmp_path / "mixed", {"a_grey": "L", "b_colour": "RGB"}, n=20)))
    assert src.channels == 3 and len(src.notes) == 1 and "mix grey and colour" in src.notes[0]
    r = run_cli("train", "--data", str(tmp_path / "mixed"), "--model", "cnn5", "--epochs", "1", "--input-size", "16",
                "--out", str(tmp_path / "run"), "--set", "train.latency=false")
    assert r.returncode == 0, r.stderr[-1500:]
    assert "mix grey and colour" in " ".join(r.stderr.split())
    grey = open_source(str(_folder(tmp_path / "grey", {"a": "L", "b": "L"})))
    assert grey.channels == 1 and grey.notes == []


def test_a_class_without_test_images_is_said(tmp_path: Path) -> None:
    p = write_npz(tmp_path / "d.npz", counts=(30, 20, 10))
    d = dict(np.load(p))
    keep = d["test_labels"][:, 0] != 2
    d["test_images"], d["test_labels"] = d["test_images"][keep], d["test_labels"][keep]
    np.savez(p, **d)
    bundle = build_data(load_config(None, [("data.name", str(p))]).data)
    said = [n for n in bundle.split_notes if "no test image" in n]
    assert len(said) == 1 and "['2']" in said[0] and "other 2 classes" in said[0]
    assert not [n for n in bundle.split_notes if "no val image" in n]


def _named_npz(path: Path, names: list[str]) -> Path:
    write_npz(path)
    d = dict(np.load(path))
    d["class_names"] = np.array(names)
    np.savez(path, **d)
    return path


def test_external_test_split_matches_classes_by_name(tmp_path: Path) -> None:
    from medistill.commands.evaluate import _classes_by_name
    from medistill.errors import ConfigError

    bundle = build_data(load_config(None, [("data.name", str(_named_npz(tmp_path / "o.npz", ["c", "b", "a"])))]).data)
    same = _classes_by_name(bundle, ["c", "b", "a"], "o.npz")
    assert same is bundle
    moved = _classes_by_name(bundle, ["a", "b", "c"], "o.npz")
    assert moved.class_names == ["a", "b", "c"]
    assert np.array_equal(moved.source.labels, 2 - bundle.source.labels)   # c→2, b→1, a→0
    with pytest.raises(ConfigError, match=r"names its classes \['c', 'b', 'a'\] but the model predicts \['x', 'y', 'z'\]"):
        _classes_by_name(bundle, ["x", "y", "z"], "o.npz")
    # from the command line: exit 2, the two lists and the way out named, nothing written
    own = _named_npz(tmp_path / "own.npz", ["x", "y", "z"])
    run = tmp_path / "run"
    assert run_cli("train", "--data", str(own), "--model", "cnn5", "--epochs", "1", "--out", str(run),
                   "--set", "train.latency=false").returncode == 0
    other = tmp_path / "other.npz"
    d = dict(np.load(tmp_path / "o.npz"))
    d["train_images"] = d["train_images"][::-1].copy()   # other pixels than the run's data
    np.savez(other, **d)
    r = run_cli("evaluate", str(run), "--data", str(other))
    said = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2 and "names its classes ['c', 'b', 'a']" in said and "--split all" in said
    assert not (run / "students" / "student" / "external").exists()


def test_a_cache_built_under_autocast_is_not_reused_in_fp32(tmp_path: Path) -> None:
    """bf16 teacher outputs differ from fp32 ones: the precision is part of the cache's identity
    (fp32 keeps its earlier manifest, so existing caches stay valid)."""
    from types import SimpleNamespace

    from medistill.distill.cache import _manifest, manifest_key

    t = SimpleNamespace(name="t", sha256="ab", taps=set(), pre=SimpleNamespace(
        input_size=16, in_chans=3, mean=torch.zeros(3), std=torch.ones(3)))
    data = SimpleNamespace(source=SimpleNamespace(fingerprint="f"), image_size=16, unlabeled=None)
    idx = np.arange(5)
    fp32, bf16 = (_manifest(t, data, [0, 4], idx, None, False, amp) for amp in ("off", "bf16"))
    assert "amp" not in fp32 and bf16["amp"] == "bf16" and manifest_key(fp32) != manifest_key(bf16)
