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


def test_resume_removes_a_killed_writes_temporary_and_falls_back_past_a_foreign_checkpoint(tmp_path: Path) -> None:
    import torch

    from conftest import run_cli

    npz = write_npz(tmp_path / "tiny.npz")
    out = tmp_path / "run"
    base = ["train", "--data", str(npz), "--model", "cnn5", "--out", str(out), "--set", "train.latency=false",
            "--set", "students.0.kwargs={widths: [4, 4, 8, 8, 8]}"]
    assert run_cli(*base, "--epochs", "2").returncode == 0
    # a SIGKILL inside atomic_path leaves its temporary (0 bytes or partial) beside the checkpoint
    stale = out / ".checkpoint_last.pt.k3j_x9ab.tmp"
    stale.write_bytes(b"")
    mine = out / "notes.tmp"            # not of the temporary pattern: a user's file stays
    mine.write_text("mine")
    torch.save(torch.zeros(3), out / "checkpoint_last.pt")   # loads with weights_only=True, not a checkpoint
    r = run_cli(*base, "--epochs", "3", "--resume")
    said = "".join((r.stdout + r.stderr).split())       # rich folds long paths anywhere
    assert r.returncode == 0, said[-800:]
    for words in ("checkpoint_last.pt is not a medistill checkpoint (it holds a Tensor",
                  "resuming from checkpoint_prev.pt (epoch 1)",
                  "removed 1 temporary file(s) an interrupted write left: .checkpoint_last.pt.k3j_x9ab.tmp"):
        assert "".join(words.split()) in said, words
    assert not stale.exists() and mine.read_text() == "mine"
    assert torch_load(out / "checkpoint_last.pt")["epoch"] == 2
