"""Bad inputs found by trying medistill as a new user (issue "Hardening"), and generated inputs:
every reader either loads its input correctly or raises the documented MedistillError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from conftest import run_cli, run_engine, tiny_cfg, write_npz
from medistill.config import load_config
from medistill.data import build_data
from medistill.data.sources import from_csv, from_folder, from_medmnist
from medistill.errors import ConfigError, DataError, MedistillError, ModelError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    p = run_cli(*args)
    p.stderr = " ".join(p.stderr.split())
    return p


def _npz(path: Path, **parts: np.ndarray) -> Path:
    np.savez(path, **parts)
    return path


def _split_arrays(n: int = 6, size: int = 8, c: int = 3) -> dict[str, np.ndarray]:
    out = {}
    for s in ("train", "val", "test"):
        out[f"{s}_images"] = np.zeros((n, size, size, c), np.uint8)
        out[f"{s}_labels"] = (np.arange(n) % 3)[:, None].astype(np.uint8)
    return out


def test_npz_splits_with_different_channels_or_sizes(tmp_path: Path) -> None:
    a = _split_arrays()
    a["val_images"] = np.zeros((6, 8, 8), np.uint8)          # 1-channel val beside 3-channel train
    with pytest.raises(DataError, match="differ in size or channels"):
        from_medmnist(str(_npz(tmp_path / "c.npz", **a)))
    a = _split_arrays()
    a["val_images"] = np.zeros((6, 10, 10, 3), np.uint8)
    with pytest.raises(DataError, match="val 10×10×3"):
        from_medmnist(str(_npz(tmp_path / "s.npz", **a)))


def test_npz_channels_first_is_named(tmp_path: Path) -> None:
    a = {k: (np.moveaxis(v, -1, 1) if k.endswith("images") else v) for k, v in _split_arrays(size=28).items()}
    with pytest.raises(DataError, match="channels-first"):
        from_medmnist(str(_npz(tmp_path / "cf.npz", **a)))


def test_npz_float_labels_and_out_of_range_labels(tmp_path: Path) -> None:
    a = _split_arrays()
    a["train_labels"] = a["train_labels"].astype(np.float32) + 0.5
    with pytest.raises(DataError, match="not a whole number"):
        from_medmnist(str(_npz(tmp_path / "f.npz", **a)))
    a = _split_arrays()
    a["train_labels"] = a["train_labels"].astype(np.float64)     # integral floats are fine
    assert from_medmnist(str(_npz(tmp_path / "g.npz", **a))).num_classes == 3
    a = _split_arrays()
    a["train_labels"][0] = 250
    with pytest.raises(DataError, match="implies 251 classes"):
        from_medmnist(str(_npz(tmp_path / "r.npz", **a)))


def test_float_tiff_in_unit_range_is_not_black(tmp_path: Path) -> None:
    from medistill.data.sources import pil_to_array

    img = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F")
    assert pil_to_array(img, 1).max() == 128


def test_decompression_bomb_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "f"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64)).save(root / c / f"{i}.png")
    src = from_folder(root)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # every 64×64 image is now "too large"
    with pytest.raises(DataError, match="decompression bomb"):
        src.load(0)


def test_csv_duplicates_bom_and_folder_strays(tmp_path: Path) -> None:
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "dup.csv").write_text("path,label\n0.png,0\n1.png,1\n0.png,0\n")
    with pytest.raises(DataError, match="listed more than once"):
        from_csv(tmp_path / "dup.csv")
    (tmp_path / "bom.csv").write_text("\ufeffpath,label\n0.png,a\n1.png,b\n", encoding="utf-8")
    assert from_csv(tmp_path / "bom.csv").class_names == ["a", "b"]
    root = tmp_path / "splits"
    for s in ("train", "test", "extra_class"):
        (root / s / "x").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / s / "x" / "0.png")
    with pytest.raises(DataError, match="extra_class/ beside them"):
        from_folder(root)


def test_fractions_and_model_kwargs_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be below 1"):
        load_config(None, ["data.val_fraction=0.6", "data.test_fraction=0.5"])
    from medistill.models import create_model

    with pytest.raises(ModelError, match="keyword arguments"):
        create_model("cnn5", 3, 3, 16, foo=1)
    with pytest.raises(ModelError, match="keyword arguments"):
        create_model("resnet18", 3, 3, 16, foo=1)


def test_saved_split_out_of_range_negative_or_overlapping(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    cfg = load_config(None, [f"data.name={npz}"]).data
    good = build_data(cfg).split_record()
    for bad, msg in (({**good, "test": [0, 10_000]}, "outside"), ({**good, "test": [-1]}, "outside"),
                     ({**good, "test": good["train"][:2]}, "in both train and test"),
                     ({**good, "fingerprint": "0" * 32}, "another version of the data")):
        with pytest.raises(DataError, match=msg):
            build_data(cfg, fixed_splits=bad)


def test_evaluate_bad_split_keeps_metrics(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    run = run_engine(tiny_cfg(npz, tmp_path / "r", epochs=1)).out
    before = (run / "metrics.json").read_text()
    split = json.loads((run / "split.json").read_text())
    split["test"] = [-3, *split["test"][1:]]
    (run / "split.json").write_text(json.dumps(split))
    p = cli("evaluate", str(run), "--no-latency")
    assert p.returncode == 2 and "outside" in p.stderr and "Traceback" not in p.stderr
    assert (run / "metrics.json").read_text() == before


def test_teacher_from_other_data_is_refused(tmp_path: Path) -> None:
    a = write_npz(tmp_path / "a.npz", seed=0)
    b = write_npz(tmp_path / "b.npz", seed=5)           # same class count, other images
    teacher = run_engine(tiny_cfg(a, tmp_path / "t", epochs=1)).out
    cfg = tiny_cfg(b, tmp_path / "s", epochs=1)
    cfg["teachers"] = [{"name": "t", "checkpoint": str(teacher)}]
    cfg["terms"] = [{"type": "ce"}, {"type": "kd"}]
    with pytest.raises(ModelError, match="another dataset"):
        run_engine(cfg)
    assert not (tmp_path / "s").exists()                 # no empty folder left behind
    cfg["teachers"][0]["allow_other_data"] = True
    run_engine(cfg)


def test_truncated_checkpoint_and_resume_on_missing_folder(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    run = run_engine(tiny_cfg(npz, tmp_path / "r", epochs=1)).out
    ck = run / "checkpoint_last.pt"
    ck.write_bytes(ck.read_bytes()[:200])
    cfg = tiny_cfg(npz, tmp_path / "r", epochs=1)
    with pytest.raises(ConfigError, match="unreadable"):
        run_engine(cfg, resume=True)
    # With two epochs written, the previous checkpoint is kept and --resume falls back to it.
    run2 = run_engine(tiny_cfg(npz, tmp_path / "r2", epochs=2)).out
    assert (run2 / "checkpoint_prev.pt").is_file()
    before = json.loads((run2 / "metrics.json").read_text())["test"]
    (run2 / "checkpoint_last.pt").write_bytes(b"junk")
    run_engine(tiny_cfg(npz, tmp_path / "r2", epochs=2), resume=True)   # re-runs epoch 2 from epoch 1's state
    assert json.loads((run2 / "metrics.json").read_text())["test"] == before
    with pytest.raises(ConfigError, match="does not exist"):
        run_engine(tiny_cfg(npz, tmp_path / "nothere", epochs=1), resume=True)
    assert not (tmp_path / "nothere").exists()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    run = run_engine(tiny_cfg(npz, tmp_path / "r", epochs=1)).out
    p = cli("explain", str(run), "--methods", "gradcam,foo")
    assert p.returncode == 2 and "unknown explanation method" in p.stderr and "Traceback" not in p.stderr
    p = cli("report", str(tmp_path))
    assert p.returncode == 2 and "not a finished medistill run" in p.stderr
    p = cli("train", "--data", str(npz), "--model", "cnn5", "--set", "students.0.kwargs.foo=1",
            "--out", str(tmp_path / "k"))
    assert p.returncode == 2 and "keyword arguments" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "k").exists()


def test_unexpected_error_points_to_a_log(tmp_path: Path) -> None:
    """An unforeseen exception prints one line and a log file path, not a traceback."""
    code = ("import sys, medistill.cli as c\n"
            "def boom(*a, **k):\n    raise RuntimeError('kaboom')\n"
            "c.app = boom\nsys.argv = ['medistill', 'train']\nc.main()\n")
    env = {**ENV, "XDG_STATE_HOME": str(tmp_path), "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    err = " ".join(p.stderr.split())
    assert p.returncode == 1 and "internal error: RuntimeError: kaboom" in err and "Traceback (most" not in err
    log = err.split("Traceback: ")[1].split(" (rerun")[0]
    assert "kaboom" in Path(log).read_text()
    p = subprocess.run([sys.executable, "-c", code.replace("'train']", "'train', '--debug']")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert "Traceback (most recent call last)" in p.stderr


# ---------------------------------------------------------------------------------- generated inputs
_GEN = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_GEN
@given(data=st.data())
def test_generated_npz_loads_or_raises_data_error(tmp_path: Path, data: st.DataObject) -> None:
    parts = {}
    for s in ("train", "val", "test"):
        dtype = data.draw(st.sampled_from([np.uint8, np.uint8, np.float32, np.int16]))
        shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=6))
        parts[f"{s}_images"] = data.draw(hnp.arrays(dtype, shape, elements=st.integers(0, 255) if dtype != np.float32
                                                    else st.floats(0, 1, width=32)))
        n = data.draw(st.integers(0, 7))
        ldtype = data.draw(st.sampled_from([np.uint8, np.int64, np.float32]))
        parts[f"{s}_labels"] = data.draw(hnp.arrays(ldtype, (n, 1), elements=st.integers(0, 4) if ldtype != np.float32
                                                    else st.one_of(st.floats(-1, 5, width=32), st.just(float("nan")))))
    path = tmp_path / "g.npz"
    np.savez(path, **parts)
    try:
        src = from_medmnist(str(path))
    except DataError:
        return
    # Loaded: the invariants the rest of medistill relies on.
    assert src.labels.dtype == np.int64 and src.labels.min() >= 0
    assert set(np.unique(src.labels)) == set(range(src.num_classes))
    assert src.load(0).dtype == np.uint8 and src.load(0).shape[-1] in (1, 3)


@_GEN
@given(rows=st.lists(st.tuples(st.sampled_from(["0.png", "1.png", "2.png", "../x.png", "", "nope.png"]),
                               st.sampled_from(["0", "1", "2", "-1", "a", "7"]),
                               st.sampled_from(["", "train", "test", "val", "bogus"])), min_size=0, max_size=6),
       bom=st.booleans())
def test_generated_manifest_loads_or_raises_data_error(tmp_path: Path, rows: list, bom: bool) -> None:
    for i in range(3):
        if not (tmp_path / f"{i}.png").exists():
            Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    text = "path,label,split\n" + "".join(f"{p},{y},{s}\n" for p, y, s in rows)
    (tmp_path / "m.csv").write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    try:
        src = from_csv(tmp_path / "m.csv")
    except DataError:
        return
    assert len(src) == len(rows) and len({str(p) for p in src._paths}) == len(rows)
    assert set(np.unique(src.labels)) == set(range(src.num_classes))


@_GEN
@given(key=st.sampled_from(["train.epochs", "data.val_fraction", "optim.lr", "students.0.model", "train.bogus",
                            "data.augment", "students.5.model", "terms", "data.subset.fraction"]),
       value=st.one_of(st.integers(-3, 3), st.floats(-1, 2), st.text(max_size=5), st.booleans(), st.none()))
def test_generated_overrides_validate_or_raise_config_error(key: str, value: object) -> None:
    try:
        load_config(None, [f"{key}={json.dumps(value)}"])
    except MedistillError:
        pass


def test_flags_reach_the_config_typed(tmp_path: Path) -> None:
    """`--data 2024` is the dataset named "2024", not the number 2024 (it used to fail with
    "data.name: Input should be a valid string")."""
    p = cli("train", "--data", "2024", "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "dataset '2024' not found" in p.stderr and "valid string" not in p.stderr
    p = cli("train", "--data", "yes", "--out", str(tmp_path / "y"))
    assert p.returncode == 2 and "dataset 'yes' not found" in p.stderr
