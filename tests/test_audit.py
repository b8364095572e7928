"""``medistill audit`` and ``data.duplicates``: label conflicts and copies on our real ISIC files,
near-duplicate search against brute force, cleanlab's ranking on labels flipped on purpose,
``drop``, and class names carried by an ``.npz``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED, TINY_CNN, make_images, run_cli, run_engine, tiny_cfg, write_npz
from medistill.commands.audit import audit_data
from medistill.config import DataConfig
from medistill.data import audit as A
from medistill.data.dataset import build_data
from medistill.errors import DataError

ISIC9 = ["actinic keratosis", "basal cell carcinoma", "dermatofibroma", "melanoma", "nevus",
         "pigmented benign keratosis", "seborrheic keratosis", "squamous cell carcinoma", "vascular lesion"]


def test_isic9_label_conflicts_and_copies_are_named(tmp_path: Path) -> None:
    rep = audit_data(SHARED / "isic9_64.npz", out=tmp_path / "a", class_names=ISIC9)
    ex = rep["exact"]
    assert ex["label_conflict_groups"] == 155 and ex["label_conflict_images"] == 310
    assert ex["label_conflicts"] == {"melanoma / seborrheic keratosis": 78, "actinic keratosis / nevus": 77}
    assert ex["across_splits"] == {"test copies train": 48, "val copies train": 23, "test copies val": 7}
    saved = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert saved["exact"]["label_conflicts"] == ex["label_conflicts"]
    assert rep["near"]["threshold_bits"] == 4 and rep["classes"]["missing"] == {}


def test_isic8_is_clean_of_both() -> None:
    b = build_data(DataConfig(name=str(SHARED / "isic8_64.npz"), duplicates="off"))
    s = A.summarize_copies(A.copy_groups(b.source, b.splits, decode=True), b.class_names)
    assert s["label_conflict_groups"] == 0 and s["across_splits"] == {}
    assert b.class_names[3] == "melanoma" and len(b.class_names) == 8   # names from the file's class_names array


def test_drop_leaves_no_copies_and_no_conflicts(tmp_path: Path) -> None:
    arr = dict(np.load(write_npz(tmp_path / "d.npz")))
    arr["test_images"][:3] = arr["train_images"][:3]                  # copies, same label
    arr["test_labels"][:3] = arr["train_labels"][:3]
    arr["val_images"][:2] = arr["train_images"][5:7]                  # copies under another label
    arr["val_labels"][:2] = (arr["train_labels"][5:7] + 1) % 3
    np.savez(tmp_path / "dup.npz", **arr)
    b = build_data(DataConfig(name=str(tmp_path / "dup.npz"), duplicates="drop"))
    s = A.summarize_copies(A.copy_groups(b.source, b.splits), b.class_names)
    assert s["label_conflict_groups"] == 0 and s["across_splits"] == {}
    assert any("removed 4 label-conflicting image(s) and 3 copies in a later split" in n for n in b.split_notes)
    assert len(b.split_record()["dropped"]) == 7
    n_train = len(arr["train_labels"])
    assert len(b.splits["train"]) == n_train - 2                      # the conflicting training images left too
    line = A.one_line(A.summarize_copies(A.copy_groups(b.source, build_data(DataConfig(
        name=str(tmp_path / "dup.npz"), duplicates="off")).splits), b.class_names), "dup.npz")
    assert line is not None and "2 images carry two labels" in line and "3 test copies train" in line


def test_near_pairs_equal_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    flips = [np.uint64(1) << np.uint64(int(b)) for b in rng.integers(0, 64, size=200)]
    h = np.concatenate([base, [base[i % 40] ^ flips[i] ^ flips[(i * 7) % 200] for i in range(60)]]).astype(np.uint64)
    for t in (0, 2, 4, 6):
        brute = sorted((a, b, bin(int(h[a] ^ h[b])).count("1")) for a in range(len(h)) for b in range(a + 1, len(h))
                       if bin(int(h[a] ^ h[b])).count("1") <= t)
        assert A.near_pairs(h, t) == brute


def test_cleanlab_ranks_flipped_labels_first(tmp_path: Path) -> None:
    x, y = make_images([60, 60, 60], 16, 3, seed=1)
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y), size=18, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 3, size=18)) % 3
    xv, yv = make_images([10, 10, 10], 16, 3, seed=2)
    xt, yt = make_images([10, 10, 10], 16, 3, seed=3)
    np.savez(tmp_path / "noisy.npz", train_images=x, train_labels=noisy[:, None], val_images=xv, val_labels=yv[:, None],
             test_images=xt, test_labels=yt[:, None])
    cfg = tiny_cfg(tmp_path / "noisy.npz", tmp_path / "t", epochs=4)
    cfg["students"] = [{"name": "t", "model": "cnn5", "kwargs": TINY_CNN}]
    run_engine(cfg)
    rep = audit_data(tmp_path / "t", oof=5, out=tmp_path / "a")
    rows = [r for r in rep["label_issues"]["top"] + _csv_rows(tmp_path / "a" / "label_issues.csv") if r["split"] == "train"]
    ranked = list(dict.fromkeys(int(r["index"]) for r in sorted(rows, key=lambda r: int(r["rank"]))))
    bundle = build_data(DataConfig(name=str(tmp_path / "noisy.npz")))
    truly = set(bundle.splits["train"][np.isin(bundle.splits["train"], flipped)].tolist())   # source ids: train comes first
    top = ranked[:len(flipped)]
    precision = len(set(top) & truly) / len(flipped)
    print(f"precision at {len(flipped)}: {precision:.3f}")
    assert precision >= 0.7, precision   # measured 2026-12-04: 0.889 (16 of 18); floor 0.7
    assert all(Path(r["image"]).is_file() for r in _csv_rows(tmp_path / "a" / "label_issues.csv"))


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_npz_class_names_and_bad_names(tmp_path: Path) -> None:
    arr = dict(np.load(write_npz(tmp_path / "d.npz")))
    np.savez(tmp_path / "n.npz", **arr, class_names=np.array(["benign", "in situ", "invasive"]))
    assert build_data(DataConfig(name=str(tmp_path / "n.npz"))).class_names == ["benign", "in situ", "invasive"]
    np.savez(tmp_path / "bad.npz", **arr, class_names=np.array(["a", "a", "b"]))
    with pytest.raises(DataError, match="class_names must be distinct and non-empty"):
        build_data(DataConfig(name=str(tmp_path / "bad.npz")))
    with pytest.raises(DataError, match="data.class_names lists 2 names but .* has 3 classes"):
        build_data(DataConfig(name=str(tmp_path / "d.npz"), class_names=["x", "y"]))


def test_audit_cli_errors(tmp_path: Path) -> None:
    r = run_cli("audit", str(tmp_path / "nope.npz"))
    assert r.returncode == 2 and "nope.npz" in r.stderr + r.stdout
    r = run_cli("audit", str(write_npz(tmp_path / "d.npz")), "--near-threshold", "40")
    assert r.returncode == 2 and "--near-threshold 40" in r.stderr + r.stdout
    r = run_cli("audit", str(tmp_path / "d.npz"), "--out", str(tmp_path / "o"))
    assert r.returncode == 0 and (tmp_path / "o" / "audit.json").is_file()
    assert "label conflicts" in r.stdout + r.stderr


def test_a_run_prints_the_audit_line_not_a_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    arr = dict(np.load(write_npz(tmp_path / "d.npz")))
    arr["test_images"][:2] = arr["train_images"][:2]
    np.savez(tmp_path / "dup.npz", **arr)
    r = run_cli("train", "--data", str(tmp_path / "dup.npz"), "--model", "cnn5", "--epochs", "1", "--out",
                str(tmp_path / "run"), "--set", "train.latency=false")
    assert r.returncode == 0, r.stderr
    assert "data: data audit of" in " ".join((r.stdout + r.stderr).split()) and "2 test copies train" in r.stderr + r.stdout
    assert not [w for w in recwarn if "duplicate" in str(w.message) or "copies" in str(w.message)]


def test_file_digests_are_remembered_per_folder_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder's quick copy check reads every file once: the next run takes the digests from the
    cache; a changed file changes the folder's fingerprint, and its digests are computed again."""
    from PIL import Image

    from medistill.data.sources import from_folder

    root = tmp_path / "f"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (30 * i + 1, 0, 0) if c == "a" else (0, 30 * i + 1, 0)).save(root / c / f"{i}.png")
    (root / "b" / "0.png").write_bytes((root / "a" / "1.png").read_bytes())     # a label conflict
    src = from_folder(root)
    splits = {"train": np.arange(6), "val": np.array([6]), "test": np.array([7])}
    first = A.copy_groups(src, splits)
    assert [g.conflict for g in first] == [True]
    calls = []
    real = A.content_hash
    monkeypatch.setattr(A, "content_hash", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    again = A.copy_groups(from_folder(root), splits)
    assert calls == [] and [g.indices for g in again] == [g.indices for g in first]
    Image.new("RGB", (9, 9), (1, 2, 3)).save(root / "a" / "1.png")      # now unlike b/0.png
    changed = from_folder(root)
    assert changed.fingerprint != src.fingerprint
    assert A.copy_groups(changed, splits) == [] and len(calls) == 8
