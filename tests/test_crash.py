"""A real `medistill train` process killed with SIGKILL mid-run resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_npz
from medistill.io import torch_load

ARGS = ["--model", "cnn5", "--epochs", "8", "--set", "students.0.kwargs={widths: [8, 8, 16, 16, 16]}",
        "--set", "train.latency=false", "--set", "train.batch_size=16", "--set", "train.progress=false"]


def _train(npz: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "medistill", "train", "--data", str(npz), "--out", str(out), *ARGS, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz", counts=(150, 100, 60))
    full = _train(npz, tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read().decode()[-2000:]

    cut = tmp_path / "cut"
    p = _train(npz, cut)
    log = cut / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        # epoch 3 logged ⇒ epoch 2's checkpoint is on disk (it is written before epoch 3 starts)
        if log.is_file() and len(log.read_text().splitlines()) >= 4:
            time.sleep(0.05)  # somewhere inside the next epoch
            break
        time.sleep(0.01)
    assert p.poll() is None, "run finished before it could be killed; make it longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    st = torch_load(cut / "checkpoint_last.pt")   # never half-written
    assert 2 <= st["epoch"] < 7
    json.loads((cut / "split.json").read_text())
    r = subprocess.run([sys.executable, "-m", "medistill", "train", "--resume", "--out", str(cut)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((cut / "metrics.json").read_text())
    assert a["test"] == b["test"] and a["val"] == b["val"]
    assert [json.loads(x)["epoch"] for x in (cut / "metrics.jsonl").read_text().splitlines()] == list(range(8))
