"""Test set-up: offline, quiet threading, real data from ../shared/data, tiny generated data."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HF_HUB_OFFLINE"] = "1"
SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
os.environ.setdefault("MEDISTILL_DATA_DIR", str(SHARED))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# `make test` runs the suite in parallel (pytest -n auto): one worker per core, each with one
# thread (its subprocesses too) — two 2-thread workers on 2 cores slow each other many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.slow`` tests start first (the parallel run then ends with short tests, not one
    long one); ``@pytest.mark.gpu`` tests need CUDA: skipped, with the reason, on machines without it."""
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here); benchmarks/gpu_check.sh runs `pytest -m gpu`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_images(n_per_class: list[int], size: int = 16, channels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy images: class c has a bright square in cell c of a 3×3 grid, plus noise."""
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    cell = size // 3
    for c, n in enumerate(n_per_class):
        for _ in range(n):
            im = rng.integers(0, 60, size=(size, size, channels), dtype=np.uint8)
            r, q = divmod(c % 9, 3)
            im[r * cell:(r + 1) * cell, q * cell:(q + 1) * cell] = 220
            imgs.append(im)
            labels.append(c)
    return np.stack(imgs), np.array(labels, dtype=np.uint8)


def write_npz(path: Path, counts=(30, 20, 10), size: int = 16, channels: int = 3, seed: int = 0) -> Path:
    parts = {}
    for s, scale, sd in (("train", 1.0, seed), ("val", 0.34, seed + 1), ("test", 0.5, seed + 2)):
        x, y = make_images([max(2, int(c * scale)) for c in counts], size, channels, sd)
        parts[f"{s}_images"] = x[..., 0] if channels == 1 else x
        parts[f"{s}_labels"] = y[:, None]
    np.savez(path, **parts)
    return path


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    return write_npz(tmp_path / "tiny.npz")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDISTILL_CACHE_DIR", str(tmp_path / "teacher_cache"))


TINY_CNN = {"widths": [8, 8, 16, 16, 16]}


def tiny_cfg(npz: Path, out: Path, **train: object) -> dict:
    """A run config for a 3-class 16-px npz and a tiny cnn5."""
    return {
        "data": {"name": str(npz), "augment": "none"},
        "students": [{"name": "student", "model": "cnn5", "kwargs": TINY_CNN}],
        "optim": {"name": "adamw", "lr": 3e-3},
        "train": {"epochs": 2, "batch_size": 16, "seed": 0, "latency": False, "progress": False, **train},
        "out": str(out),
    }


def run_engine(cfg: dict, resume: bool = False):
    from medistill.config import load_config
    from medistill.distill.engine import Engine

    eng = Engine(load_config(None, [], base=cfg), resume=resume)
    eng.run()
    return eng


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_npz(d / "tiny.npz")
    return d


@pytest.fixture(scope="session")
def teachers(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = []
    for i, widths in enumerate(([8, 8, 16, 16, 16], [8, 16, 16, 16, 32])):
        d = tmp_path_factory.mktemp(f"teacher{i}")
        cfg = tiny_cfg(data_dir / "tiny.npz", d / "run", epochs=2, seed=i)
        cfg["students"] = [{"name": "t", "model": "cnn5", "kwargs": {"widths": widths}}]
        run_engine(cfg)
        out.append(d / "run")
    return out




def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``medistill ARGS`` in this process, through the command line's own error boundary
    (``cli.main``): exit code, stdout and stderr as a subprocess would give them, without paying
    for a new interpreter importing torch and timm (a few seconds each on 2 cores)."""
    import contextlib
    import io
    import sys

    from medistill import cli

    out, err = io.StringIO(), io.StringIO()
    argv, code = sys.argv, 0
    sys.argv = ["medistill", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["medistill", *args], code, out.getvalue(), err.getvalue())
