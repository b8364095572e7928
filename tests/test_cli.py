"""The command line end to end, as a user runs it: in this process through the CLI's own error
boundary (``conftest.run_cli``), plus subprocess smoke tests of train, evaluate, export, predict
and report (real RetinaMNIST)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, write_npz

ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def cli(*args: str, ok: bool = True, subprocess_: bool = False) -> subprocess.CompletedProcess:
    if subprocess_:
        p = subprocess.run([sys.executable, "-m", "medistill", *args], capture_output=True, text=True, env=ENV, timeout=900)
    else:
        p = run_cli(*args)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_train_and_evaluate_retinamnist(tmp_path: Path) -> None:
    out = tmp_path / "x"
    cli("train", "--data", "retinamnist", "--model", "resnet18", "--epochs", "1", "--out", str(out),
        "--set", "data.subset.max_samples=160", "--set", "train.latency=false", subprocess_=True)
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["n"] == 400 and m["val"]["n"] == 120
    assert "bal. ACC" in (out / "summary.md").read_text()
    cli("evaluate", str(out), "--out", str(tmp_path / "ev"), "--no-latency", subprocess_=True)
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["test"] == m["test"] and again["val"] == m["val"]


def test_grayscale_npz_by_path(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "gray.npz", channels=1)
    out = tmp_path / "g"
    cli("train", "--data", str(npz), "--model", "cnn5", "--epochs", "1", "--out", str(out),
        "--set", "students.0.kwargs={widths: [4, 4, 8, 8, 8]}", "--set", "train.latency=false")
    spec = json.loads((out / "students" / "student" / "model.json").read_text())
    assert spec["in_chans"] == 1 and spec["data_chans"] == 1


def test_distill_method_preset_and_errors(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    small = ["--set", "students.0.kwargs={widths: [4, 4, 8, 8, 8]}", "--set", "train.latency=false"]
    cli("train", "--data", str(npz), "--model", "cnn5", "--epochs", "1", "--out", str(tmp_path / "t"), *small)
    p = cli("distill", "--teacher", str(tmp_path / "t"), "--method", "dkd", "--data", str(npz), "--model", "cnn5",
            "--epochs", "1", "--out", str(tmp_path / "s"), *small)
    assert "method dkd" in p.stderr and (tmp_path / "s" / "students" / "student" / "metrics.json").is_file()
    # --set items that address the lists --teacher and --method build are applied to them
    cli("distill", "--teacher", str(tmp_path / "t"), "--method", "kd", "--data", str(npz), "--model", "cnn5",
        "--epochs", "1", "--out", str(tmp_path / "s2"), "--set", "teachers.0.input_size=24",
        "--set", "terms.1.temperature=2", *small)
    import yaml

    saved = yaml.safe_load((tmp_path / "s2" / "config.yaml").read_text())
    assert saved["teachers"][0]["input_size"] == 24 and saved["terms"][1]["temperature"] == 2
    bad = cli("train", "--data", "nosuchmnist", "--out", str(tmp_path / "n"), ok=False)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("train", "--data", str(npz), "--model", "resnet-18", "--out", str(tmp_path / "m"), ok=False)
    assert "Did you mean" in bad.stderr and "resnet18" in bad.stderr
    bad = cli("train", "--data", str(npz), "--set", "train.epocs=2", "--out", str(tmp_path / "k"), ok=False)
    assert "train.epocs" in bad.stderr and "unknown key" in bad.stderr


def test_help_on_every_command() -> None:
    for cmd in (["--help"], ["train", "--help"], ["distill", "--help"], ["evaluate", "--help"], ["explain", "--help"],
                ["models", "taps", "--help"]):
        assert "Usage" in cli(*cmd).stdout


def test_models_taps() -> None:
    out = cli("models", "taps", "resnet18", "--input-size", "28").stdout
    assert "layer4" in out and "512×4×4" in out


@pytest.mark.slow
def test_report_export_predict_commands(tmp_path: Path) -> None:
    from PIL import Image

    npz = write_npz(tmp_path / "d.npz")
    out = tmp_path / "r"
    p = cli("train", "--data", str(npz), "--model", "cnn5", "--epochs", "1", "--out", str(out),
            "--set", "students.0.kwargs={widths: [4, 4, 8, 8, 8]}", "--set", "train.latency=false")
    assert "report:" in p.stdout and (out / "report.html").is_file()
    p = cli("export", str(out), "--format", "onnx", subprocess_=True)
    assert "max |Δ|" in p.stdout
    img = tmp_path / "x.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(img)
    onnx_path = out / "students" / "student" / "model.onnx"
    lines = [json.loads(x) for x in cli("predict", str(onnx_path), str(img), subprocess_=True).stdout.splitlines()]
    assert len(lines) == 1 and len(lines[0]["probabilities"]) == 3
    cam = cli("predict", str(out), str(img), "--cam", "--out", str(tmp_path)).stdout
    assert (tmp_path / "x_cam.png").is_file() and '"cam"' in cam
    cli("report", str(out), str(out), "--out", str(tmp_path / "cmp.html"), subprocess_=True)
    assert "Comparison" in (tmp_path / "cmp.html").read_text()


@pytest.mark.slow
def test_demo_quick(tmp_path: Path) -> None:
    """`make demo` runs medistill.commands.demo; --quick is the same pipeline with tiny models and subsets."""
    p = subprocess.run(
        [sys.executable, "-m", "medistill.commands.demo", "--quick", "--out", str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "HTML report" in p.stdout and list(tmp_path.glob("*/report.html"))
    assert "Did distillation help?" in p.stdout and "student alone (logit-adjusted CE)" in p.stdout
    assert list(tmp_path.glob("*/teachers/ensemble.json"))
    for run in ("teachers", "alone-seed-0", "kd-seed-0", "alone-seed-1", "kd-seed-1"):
        assert list(tmp_path.glob(f"*/{run}/metrics.json")), run
    import yaml

    # one pair per student seed, the verdict over the seeds' paired differences
    verdict = json.loads(next(tmp_path.glob("*/verdict.json")).read_text())
    assert verdict["seeds"] == 2 and len(verdict["diffs"]) == 2
    assert "seeds' paired 95 % intervals lie above zero" in " ".join(p.stdout.split())
    for seed in (0, 1):
        cfg = yaml.safe_load(next(tmp_path.glob(f"*/kd-seed-{seed}/config.yaml")).read_text())
        assert cfg["train"]["seed"] == seed
    # both arms train with the same supervised loss: the difference is the teacher's
    alone = yaml.safe_load(next(tmp_path.glob("*/alone-seed-0/config.yaml")).read_text())
    kd = yaml.safe_load(next(tmp_path.glob("*/kd-seed-0/config.yaml")).read_text())
    assert alone["train"]["loss"] == "logit_adjusted" and not alone["terms"]
    assert [t["type"] for t in kd["terms"]] == ["logit_adjusted", "kd"] and kd["terms"][1]["logit_adjust"] == 1.0
