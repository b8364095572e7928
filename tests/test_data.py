"""Loaders on tiny generated npz / folders / CSV, bad inputs, splits and imbalance tools."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED, make_images, write_npz
from medistill.config import DataConfig
from medistill.data import build_data, open_source
from medistill.data import splits as sp
from medistill.data.medmnist import resolve
from medistill.data.transforms import apply_view
from medistill.errors import DataError


def test_npz_rgb_and_gray(tmp_path: Path) -> None:
    for ch in (3, 1):
        p = write_npz(tmp_path / f"d{ch}.npz", channels=ch)
        b = build_data(DataConfig(name=str(p)))
        assert b.channels == ch and b.num_classes == 3 and b.image_size == 16
        x, y, i, v = b.dataset("train", train=True)[0]
        assert x.shape == (ch, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
        assert b.split_origin == "dataset"


def test_retinamnist_real_file() -> None:
    b = build_data(DataConfig(name="retinamnist"))
    assert [len(b.splits[k]) for k in ("train", "val", "test")] == [1080, 120, 400]
    assert b.counts("train").tolist() == [486, 128, 206, 194, 66]
    assert b.counts("test").tolist() == [174, 46, 92, 68, 20]


def test_missing_dataset_says_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDISTILL_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as e:
        resolve("breastmnist_64")
    msg = str(e.value)
    assert str(tmp_path / "breastmnist_64.npz") in msg and "zenodo" in msg


def test_md5_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_npz(tmp_path / "retinamnist.npz")
    monkeypatch.setenv("MEDISTILL_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="md5 .* holds 60/19/30 train/val/test images where the current release "
                                        "\\(v3\\) holds 1080/120/400: an older MedMNIST release"):
        resolve("retinamnist")


def test_medmnist_tables_equal_the_medmnist_package() -> None:
    """The checksums and split sizes against medmnist 3.0.2's own INFO table, read as a Python
    literal from the installed package's file (installed without its dependencies by `make`;
    never imported, never executed)."""
    import ast
    from importlib import metadata

    from medistill.data import medmnist as M

    try:
        info_py = metadata.distribution("medmnist").locate_file("medmnist/info.py")
    except metadata.PackageNotFoundError:
        pytest.skip("the medmnist package is not installed (make installs it without dependencies)")
    tree = ast.parse(Path(str(info_py)).read_text())
    [info] = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
              and getattr(n.targets[0], "id", None) == "INFO"]
    flat = {k: v for k, v in info.items() if not k.endswith("3d")}
    want = {**{k: v["MD5"] for k, v in flat.items()},
            **{f"{k}_{s}": v[f"MD5_{s}"] for k, v in flat.items() for s in (64, 128, 224)}}
    assert M.MD5 == want
    assert M.SPLIT_COUNTS == {k: (v["n_samples"]["train"], v["n_samples"]["val"], v["n_samples"]["test"])
                              for k, v in flat.items()}
    assert M.MD5["organamnist"] == "68e3f8846a6bd62f0c9bf841c0d9eacc" and M.SPLIT_COUNTS["organamnist"][0] == 34561
    assert all(v["url"].startswith(M.ZENODO_RECORD) for v in flat.values())


def test_npz_with_bad_labels(tmp_path: Path) -> None:
    p = tmp_path / "bad.npz"
    x, y = make_images([3, 3])
    np.savez(p, train_images=x, train_labels=np.stack([y, y], 1), val_images=x, val_labels=y[:, None],
             test_images=x, test_labels=y[:, None])
    with pytest.raises(DataError, match="multi-label"):
        build_data(DataConfig(name=str(p)))


def _write_folder(root: Path, counts: dict[str, int], mode: str = "RGB", size: int = 20) -> None:
    for ci, (c, n) in enumerate(counts.items()):
        (root / c).mkdir(parents=True)
        x, _ = make_images([n], size, 3, seed=ci)
        for k in range(n):
            img = Image.fromarray(x[k])
            if mode == "L":
                img = img.convert("L")
            elif mode == "RGBA":
                img = img.convert("RGBA")
            elif mode == "I;16":
                img = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257))
            img.save(root / c / f"{k}.png")


@pytest.mark.parametrize("mode,chans", [("RGB", 3), ("L", 1), ("RGBA", 3), ("I;16", 1)])
def test_folder_modes(tmp_path: Path, mode: str, chans: int) -> None:
    _write_folder(tmp_path / "f", {"a": 6, "b": 6}, mode)
    b = build_data(DataConfig(name=str(tmp_path / "f"), val_fraction=0.2, test_fraction=0.2))
    assert b.channels == chans
    x, *_ = b.dataset("train", train=False)[0]
    assert x.shape == (chans, 20, 20) and float(x.max()) > 0.5  # 16-bit scaled, not clipped to 1/255
    assert b.split_origin.startswith("stratified")
    assert sum(len(v) for v in b.splits.values()) == 12


def test_bccd_tiny_class() -> None:
    b = build_data(DataConfig(name=str(SHARED / "bccd-wbc")))
    basophil = b.class_names.index("Basophil")
    for k in ("train", "val", "test"):
        assert b.counts(k)[basophil] == 1
    with pytest.raises(DataError, match="only 3 image"):
        sp.stratified_split(np.array([0] * 10 + [1] * 3), {"train": 0.5, "val": 0.2, "test": 0.2, "extra": 0.1}, 0,
                            class_names=["a", "Basophil"])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        parts = sp.stratified_split(np.array([0] * 10 + [1] * 2), {"train": 0.6, "val": 0.2, "test": 0.2}, 0,
                                    tiny_class_policy="train_only")
    assert set(parts["train"]) >= {10, 11}


def test_corrupt_image_error_and_skip(tmp_path: Path) -> None:
    _write_folder(tmp_path / "f", {"a": 6, "b": 6})
    bad = tmp_path / "f" / "a" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="3.png"):
        b = build_data(DataConfig(name=str(tmp_path / "f")))
        for k in ("train", "val", "test"):
            for i in range(len(b.dataset(k, False))):
                b.dataset(k, False)[i]
    with pytest.warns(UserWarning, match="3.png"):
        b = build_data(DataConfig(name=str(tmp_path / "f"), skip_corrupt=True))
    assert sum(len(v) for v in b.splits.values()) == 11


def test_empty_class_folder(tmp_path: Path) -> None:
    _write_folder(tmp_path / "f", {"a": 4})
    (tmp_path / "f" / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        open_source(str(tmp_path / "f"))


def test_csv_manifest(tmp_path: Path) -> None:
    _write_folder(tmp_path / "img", {"a": 5, "b": 5})
    rows = ["path,label,split"] + [f"img/{c}/{k}.png,{c},{'train' if k < 3 else 'val' if k == 3 else 'test'}"
                                   for c in "ab" for k in range(5)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    b = build_data(DataConfig(name=str(tmp_path / "m.csv")))
    assert b.class_names == ["a", "b"] and len(b.splits["train"]) == 6 and b.split_origin == "dataset"


def test_csv_refuses_escaping_paths_and_bad_rows(tmp_path: Path) -> None:
    _write_folder(tmp_path / "img", {"a": 2})
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.csv").write_text("path,label\n../img/a/0.png,0\n")
    with pytest.raises(DataError, match="escapes"):
        open_source(str(tmp_path / "sub" / "m.csv"))
    (tmp_path / "m2.csv").write_text("path,label\nimg/a/9.png,0\n")
    with pytest.raises(DataError, match="not found"):
        open_source(str(tmp_path / "m2.csv"))
    (tmp_path / "m3.csv").write_text("file,y\nimg/a/0.png,0\n")
    with pytest.raises(DataError, match="header"):
        open_source(str(tmp_path / "m3.csv"))
    (tmp_path / "m4.csv").write_text("path,label\nimg/a/0.png,-1\n")
    with pytest.raises(DataError, match="negative"):
        open_source(str(tmp_path / "m4.csv"))


def test_stratified_split_is_seeded_and_stratified() -> None:
    y = np.repeat(np.arange(3), [50, 20, 10])
    a = sp.stratified_split(y, {"train": 0.7, "val": 0.1, "test": 0.2}, 3)
    b = sp.stratified_split(y, {"train": 0.7, "val": 0.1, "test": 0.2}, 3)
    assert all((a[k] == b[k]).all() for k in a)
    assert np.bincount(y[a["test"]]).tolist() == [10, 4, 2]
    assert len(set(a["train"]) & set(a["test"])) == 0


def test_longtail_and_caps() -> None:
    y = np.repeat(np.arange(4), 100)
    idx = np.arange(400)
    lt = sp.longtail_subsample(idx, y, 10.0, 0)
    assert np.bincount(y[lt]).tolist() == [100, 46, 21, 10]
    assert np.bincount(y[sp.cap_per_class(idx, y, 30, 0)]).tolist() == [30] * 4


def test_protocols_never_touch_test() -> None:
    cfg = DataConfig(name="retinamnist", protocol="source-imbalanced")
    t = build_data(cfg, role="teacher")
    s = build_data(cfg, role="student")
    assert (t.splits["test"] == s.splits["test"]).all() and (t.splits["val"] == s.splits["val"]).all()
    assert t.counts("train").tolist() == [486, 128, 206, 194, 66]
    assert s.counts("train").tolist() == [194, 128, 194, 194, 66]
    assert set(s.splits["train"]) <= set(t.splits["train"])
    tgt = build_data(DataConfig(name="retinamnist", protocol="target-imbalanced"), role="teacher")
    assert tgt.counts("train").tolist() == [194, 128, 194, 194, 66]


def test_balanced_sampler_balances() -> None:
    b = build_data(DataConfig(name="retinamnist", balanced_sampler=True, augment="none"))
    ys = torch.cat([y for _, y, _, _ in b.loader("train", 256, train=True, seed=0)])
    frac = torch.bincount(ys, minlength=5).float() / len(ys)
    assert float(frac.min()) > 0.12  # vs 66/1080 = 0.06 without the sampler


def test_dihedral_views() -> None:
    x = torch.arange(16.0).view(1, 4, 4)
    views = {tuple(apply_view(x, v).flatten().tolist()) for v in range(8)}
    assert len(views) == 8 and torch.equal(apply_view(x, 0), x)


def test_download_checks_md5_over_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real download code against a file server on 127.0.0.1 (no internet in tests)."""
    import functools
    import hashlib
    import http.server
    import threading

    from medistill.data import medmnist

    served = tmp_path / "srv"
    served.mkdir()
    payload = write_npz(served / "pathmnist.npz")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(medmnist, "ZENODO_RECORD", f"http://127.0.0.1:{httpd.server_address[1]}")
        monkeypatch.setenv("MEDISTILL_DATA_DIR", str(tmp_path / "empty"))
        monkeypatch.setenv("MEDISTILL_CACHE_DIR", str(tmp_path / "cache"))   # datasets/ of the one cache root
        with pytest.raises(DataError, match="md5"):
            resolve("pathmnist", download=True)            # the official checksum does not match our stand-in
        assert not (tmp_path / "cache" / "datasets" / "pathmnist.npz").exists()   # nothing half-written is left behind
        monkeypatch.setitem(medmnist.MD5, "pathmnist", hashlib.md5(payload.read_bytes()).hexdigest())
        got = resolve("pathmnist", download=True)
        assert got == tmp_path / "cache" / "datasets" / "pathmnist.npz" and got.read_bytes() == payload.read_bytes()
    finally:
        httpd.shutdown()


def test_medmnist_class_names_from_the_table(tmp_path):
    """MedMNIST files get their classes' names; other npz files and unexpected class counts keep
    the label ids; a run recorded with ids (before names) still matches the named data."""
    from conftest import write_npz

    from medistill.data.medmnist import class_names, same_classes
    from medistill.data.sources import open_source

    assert class_names("pneumoniamnist", 2) == ["normal", "pneumonia"]
    assert class_names("/x/organsmnist_64.npz", 11)[3] == "heart"
    assert class_names("bloodmnist", 3) == ["0", "1", "2"]          # not the flavour's 8 classes
    assert class_names("isic8_64.npz", 3) == ["0", "1", "2"]
    blood = write_npz(tmp_path / "bloodmnist.npz", counts=(6,) * 8)
    src = open_source(str(blood))
    assert src.class_names[:2] == ["basophil", "eosinophil"] and len(src.class_names) == 8
    assert same_classes(["0", "1"], ["normal", "pneumonia"]) and same_classes(["a", "b"], ["a", "b"])
    assert not same_classes(["normal", "pneumonia"], ["pneumonia", "normal"])
    assert not same_classes(["0", "1"], ["a", "b", "c"])


def test_folder_scan_keeps_pathlib_order(tmp_path: Path) -> None:
    """The string scan lists a class folder's images in the order pathlib's sorted rglob did
    (component by component), so a folder's index order — and its seeded split — is unchanged."""
    from medistill.data.sources import IMAGE_SUFFIXES, _scan

    c = tmp_path / "c1"
    for f in ("x.png", "a-b/1.png", "a/b/2.PNG", "a/3.jpg", "A/4.png", "a.b.png", "notes.txt", ".h.png"):
        (c / f).parent.mkdir(parents=True, exist_ok=True)
        (c / f).write_bytes(b"")
    old = [str(f.relative_to(c)) for f in sorted(f for f in c.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)]
    files, skipped = _scan(c)
    assert files == old and files.index("a/b/2.PNG") < files.index("a-b/1.png") and skipped == ["notes.txt"]
