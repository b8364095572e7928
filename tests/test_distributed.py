"""torchrun with 2 CPU processes (gloo on loopback): the run trains, only rank 0 writes, and the
distributed evaluation equals a single-process evaluation of the same checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_npz
from medistill.commands.evaluate import evaluate_target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> str:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    return torchrun


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Data and a small trained cnn5 teacher, shared by the distributed tests."""
    tmp = tmp_path_factory.mktemp("ddp")
    npz = write_npz(tmp / "d.npz", counts=(40, 30, 20))
    teacher = tmp / "teacher"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDISTILL_CACHE_DIR": str(tmp / "cache")}
    t = subprocess.run([sys.executable, "-m", "medistill", "train", "--data", str(npz), "--model", "cnn5", "--epochs", "2",
                        "--out", str(teacher), "--set", "students.0.kwargs={widths: [4, 8, 8, 8, 8]}", "--set", "train.latency=false"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert t.returncode == 0, t.stderr[-2000:]
    return npz, teacher


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path, teacher_run: tuple[Path, Path]) -> None:
    torchrun = _torchrun()
    npz, teacher = teacher_run
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDISTILL_CACHE_DIR": str(tmp_path / "cache")}
    # two students, one teacher (cached by rank 0), dual-student terms: teacher, peer and CE losses under DDP
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "medistill",
           "distill", "--data", str(npz), "--teacher", str(teacher), "--method", "dual_student", "--epochs", "2", "--out", str(out),
           "--set", "students=[{name: a, model: cnn5, kwargs: {widths: [4, 4, 8, 8, 8]}}, {name: b, model: cnn5, kwargs: {widths: [4, 8, 8, 8, 8]}}]",
           "--set", "train.latency=false", "--set", "train.batch_size=8", "--set", "data.augment=flip"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one line per epoch: rank 1 wrote nothing
    assert "teacher cache built" in p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["role"] == "teacher" and set(summary) == {"teacher", "a", "b"}
    run_metrics = json.loads((out / "students" / "a" / "metrics.json").read_text())
    single = evaluate_target(out / "students" / "a", out=tmp_path / "single", latency=False)["a"]
    assert single["test"]["confusion_matrix"] == run_metrics["test"]["confusion_matrix"]
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "auroc", "ece", "nll"):
        if run_metrics["test"][k] is None:   # QWK on nominal data
            assert single["test"][k] is None, k
            continue
        assert abs(single["test"][k] - run_metrics["test"][k]) < 1e-6, k
    assert run_metrics["test"]["n"] == sum(sum(r) for r in single["test"]["confusion_matrix"])
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["dist_backend"] == "gloo"     # --device auto on a CPU host
    assert info["ddp_replica_max_abs_diff"] == 0.0      # both ranks ended with the same two students


@pytest.mark.slow
def test_torchrun_term_with_parameters_stays_in_sync(tmp_path: Path, teacher_run: tuple[Path, Path]) -> None:
    """FitNet's regressor belongs to the term, not to the DDP-wrapped student: its gradients are
    averaged by the engine. Each rank sees other images, so without that averaging the two ranks'
    regressors (and then the students) drift apart. Each rank saves its weights and BatchNorm
    statistics at the end (tests/ddp_rank_dump.py) and the test compares them itself; the engine's
    own measurement, recorded in run_info.json, must agree."""
    torchrun = _torchrun()
    npz, teacher = teacher_run
    out, dump = tmp_path / "run", tmp_path / "ranks"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDISTILL_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(Path(__file__).parent / "ddp_rank_dump.py"), str(dump),
           "distill", "--data", str(npz), "--teacher", str(teacher), "--epochs", "2", "--out", str(out),
           "--model", "cnn5", "--set", "students.0.kwargs={widths: [4, 4, 8, 8, 8]}",
           "--set", "terms=[{type: ce}, {type: fitnet, weight: 10.0, student_tap: conv3, teacher_tap: conv3}]",
           "--set", "train.latency=false", "--set", "train.batch_size=8", "--set", "data.augment=flip"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    import torch

    state = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert any("regressor" in k for k in json.dumps(list(_keys(state))).split('"')), "FitNet's regressor is in the checkpoint"
    from safetensors.torch import load_file

    r0, r1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert set(r0) == set(r1) and any(k.startswith("term.") for k in r0) and any("running_mean" in k for k in r0)
    differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert differ == [], f"the ranks ended with different {differ[:5]}"
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2
    assert info["ddp_replica_max_abs_diff"] == 0.0


def _keys(tree: object, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _keys(v, f"{prefix}{key}.")]
    return [prefix]


@pytest.mark.slow
def test_torchrun_one_process_joins_a_group(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=1`` still initialises the backend (gloo here, NCCL on a GPU),
    so a single-GPU host can check its distributed path."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    npz = write_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDISTILL_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [torchrun, "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "medistill",
           "train", "--data", str(npz), "--model", "cnn5", "--epochs", "1", "--out", str(out), "--device", "cpu",
           "--set", "students.0.kwargs={widths: [4, 4, 8, 8, 8]}", "--set", "train.latency=false"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["dist_backend"] == "gloo"
