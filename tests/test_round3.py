"""Third hardening round: what the README walk and the probe found beyond bad input — exporting a
student trained at another size than its data, transformer teachers fed at a size they were not
built for, and the resize that makes the first possible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, write_npz
from medistill.data.transforms import resize, resize_matrix


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("n_out", [8, 16, 20, 28, 41])
def test_resize_as_matrices_equals_the_antialiased_resize(mode: str, n_out: int) -> None:
    x = torch.rand(2, 3, 28, 28)
    a = resize_matrix(28, n_out, mode)
    assert a.shape == (n_out, 28)
    assert torch.allclose(a @ x @ a.T, resize(x, n_out, mode), atol=1e-6)


def test_export_of_a_student_smaller_than_its_data(tmp_path: Path) -> None:
    """Found by the README walk: a student trained at --input-size 16 on 28-px data could not be
    exported (torch's ONNX exporter has no antialiased resize): an internal error."""
    npz = write_npz(tmp_path / "d.npz", size=28)
    out = tmp_path / "run"
    assert run_cli("train", "--data", str(npz), "--model", "cnn5", "--epochs", "1", "--input-size", "16", "--out", str(out),
                   "--set", "train.latency=false", "--set", "students.0.kwargs={widths: [4, 4, 8, 8, 8]}").returncode == 0
    r = run_cli("export", str(out), "--format", "onnx")
    assert r.returncode == 0, r.stderr[-1500:]
    check = json.loads((out / "students" / "student" / "model.onnx.check.json").read_text())
    assert check["max_abs_diff"] < 1e-4     # the ONNX graph against the PyTorch student with its own resize


def test_a_transformer_teacher_at_another_size_is_refused_before_training(tmp_path: Path) -> None:
    """Found by the README walk: a ViT/Swin teacher asked for teachers.0.input_size other than the
    size it was built at ended in an internal AssertionError deep in the first forward."""
    npz = write_npz(tmp_path / "d.npz", size=32)
    t = tmp_path / "vit"
    assert run_cli("train", "--data", str(npz), "--model", "vit_tiny_patch16_224", "--epochs", "1", "--out", str(t),
                   "--set", "train.latency=false").returncode == 0
    r = run_cli("distill", "--teacher", str(t), "--method", "kd", "--model", "cnn5", "--epochs", "1",
                "--set", "teachers.0.input_size=64", "--out", str(tmp_path / "kd"))
    said = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2 and "accepts only 32×32 images" in said and "teachers.N.input_size" in said
    assert not (tmp_path / "kd" / "metrics.jsonl").exists()
    # at its own size it distils
    r = run_cli("distill", "--teacher", str(t), "--method", "kd", "--model", "cnn5", "--epochs", "1",
                "--set", "train.latency=false", "--out", str(tmp_path / "kd2"))
    assert r.returncode == 0, r.stderr[-1500:]


def test_an_in_memory_teacher_with_the_wrong_class_count_is_named(tmp_path: Path) -> None:
    from medistill import api
    from medistill.errors import ModelError

    npz = write_npz(tmp_path / "d.npz")
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16 * 3, 5))
    with pytest.raises(ModelError, match=r"returns shape \(1, 5\); expected \[B, 3\] logits"):
        api.distill(wrong, data=str(npz), model="cnn5", epochs=1, out=str(tmp_path / "o"), quiet=True)
