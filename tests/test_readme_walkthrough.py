"""The README's main path, in order, as a newcomer runs it in a fresh folder: its commands with
small models and shrunk data (data.subset.max_samples), including a distill without --data, a
seed ensemble used as a teacher, and explain from another working directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SHRINK = ["data.subset.max_samples=48", "data.max_eval_samples=40", "train.latency=false", "train.progress=false",
          "eval.bootstrap=0", "students.0.kwargs.widths=[8,8,16,16,16]"]


def _cli(args: list[str], shrink: bool = True) -> str:
    from medistill.cli import app

    extra = [a for s in SHRINK for a in ("--set", s)] if shrink else []
    res = CliRunner().invoke(app, args + extra)
    assert res.exit_code == 0, f"medistill {' '.join(args)}\n{res.output}\n{res.exception!r}"
    return res.output


def _documented(prefix: str) -> None:
    """The README still shows the command this step runs (the walk-through follows the README)."""
    assert re.search(re.escape(prefix), README), f"README no longer shows {prefix!r}"


def test_readme_walkthrough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    work = tmp_path / "fresh"
    work.mkdir()
    monkeypatch.chdir(work)
    _documented("medistill train --data retinamnist --model resnet50 --epochs 30 --out runs/t50")
    _cli(["train", "--data", "retinamnist", "--model", "cnn5", "--epochs", "1", "--out", "runs/t50"])
    _documented("medistill distill --teacher runs/t50 --method dkd --model resnet18 --epochs 30 --out runs/dkd --baseline")
    out = _cli(["distill", "--teacher", "runs/t50", "--method", "dkd", "--model", "cnn5", "--epochs", "1",
                "--out", "runs/dkd", "--baseline"])
    assert "Did distillation help?" in out and "paired bootstrap" in out
    _documented("medistill train --data ../shared/data/isic8_64.npz --model resnet18 --seeds 0,1,2 --out runs/ens")
    _cli(["train", "--data", "isic8_64.npz", "--model", "cnn5", "--epochs", "1", "--seeds", "0,1", "--out", "runs/ens"])
    _documented("medistill distill --teacher runs/ens --method kd --model mobilenetv3_small_100 --out runs/kd_ens")
    _cli(["distill", "--teacher", "runs/ens", "--method", "kd", "--model", "cnn5", "--epochs", "1", "--out", "runs/kd_ens"])
    split = json.loads(Path("runs/kd_ens/split.json").read_text())
    assert split["source"].endswith("isic8_64.npz") and len(split["class_names"]) == 8 and split["class_names"][3] == "melanoma"   # the file's own names
    _documented("medistill evaluate runs/dkd")
    _cli(["evaluate", "runs/dkd", "--no-latency"], shrink=False)
    _documented("medistill explain runs/dkd")
    other = tmp_path / "another_folder"
    other.mkdir()
    monkeypatch.chdir(other)
    _cli(["explain", str(work / "runs/dkd"), "--per-class", "1", "--methods", "gradcam", "--out", "ex"], shrink=False)
    assert (other / "ex" / "explain.json").is_file()
    monkeypatch.chdir(work)
    _documented("medistill report runs/dkd runs/kd")
    _cli(["report", "runs/dkd", "runs/dkd/alone"], shrink=False)
    assert "Did distillation help?" in Path("report.html").read_text()
    _documented("medistill export runs/dkd --format onnx")
    _cli(["export", "runs/dkd", "--format", "onnx"], shrink=False)
    onnx = next(Path("runs/dkd").rglob("model.onnx"))
    Image.fromarray(np.full((28, 28, 3), 120, np.uint8)).save("fundus.png")
    _documented("medistill predict runs/dkd/students/student/model.onnx fundus.png")
    pred = _cli(["predict", str(onnx), "fundus.png"], shrink=False)
    assert '"probabilities"' in pred or '"probs"' in pred or "class" in pred
