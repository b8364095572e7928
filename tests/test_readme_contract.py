"""The README is a contract: every command of its "Using it" block runs as written, in order, in
one fresh folder, with only the size-shrinking settings below appended. Lines the README marks
`# needs your files` must refuse with exit code 2 naming the missing file; `# needs a CUDA GPU`
lines are listed here with the reason and not run on a machine without one.

Not run here, with the reason: the quickstart's `make test` (it is this suite) and `make demo`
(its pipeline runs in test_cli.py::test_demo_quick with --quick); `export MEDISTILL_DATA_DIR=…`
(a shell line: the suite's conftest sets the variable the same way)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
REPO = Path(__file__).resolve().parents[1]
# What the test appends, and nothing else: fewer epochs, images and pixels (explain: one image per
# class and Score-CAM's top 8 channels).
SHRINK_SETS = ["data.subset.max_samples=40", "data.max_eval_samples=32", "train.latency=false",
               "train.progress=false", "eval.bootstrap=100"]
SMALL_INPUT = "16"         # --input-size for models that take any size (not transformers)
YOURS, CUDA = "needs your files", "needs a CUDA GPU"


def readme_commands() -> list[tuple[str, str]]:
    """(command, marker) for every command line of the "Using it" block, in order."""
    block = README.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    out = []
    for line in block.splitlines():
        line = line.strip()
        if not re.match(r"^(medistill|torchrun) ", line):
            continue
        cmd, _, comment = line.partition(" # ")
        marker = YOURS if YOURS in comment else CUDA if CUDA in comment else ""
        out.append((cmd.strip(), marker))
    return out


def shrink(args: list[str]) -> list[str]:
    """The README command with fewer epochs (a resume extends by one), images and pixels."""
    args = list(args)
    resume = "--resume" in args
    for i, a in enumerate(args[:-1]):
        if a == "--epochs":
            args[i + 1] = "2" if resume else "1"
    command = args[0]
    if command == "explain":     # fewer images, and Score-CAM on its 8 strongest channels instead of every one
        for i, a in enumerate(args[:-1]):
            if a == "--per-class":
                args[i + 1] = "1"
        return args + ["--top-k", "8"]
    if command not in ("train", "distill", "sweep", "recipe"):
        return args
    if "--epochs" not in args and not resume:
        args += ["--set", "train.epochs=1"]
    if command == "recipe":     # two seeds per seeded stage instead of three (UMKD's two experts stay)
        args += ["--seeds", "0,1"]
    transformer = any(m in args for m in ("swin_tiny_patch4_window7_224",)) or "scalekd" in args
    if command in ("train", "distill") and not resume and "--input-size" not in args and not transformer \
            and "--print-config" not in args and not any(a.endswith(".yaml") for a in args):
        args += ["--input-size", SMALL_INPUT]
    if not resume:
        for s in SHRINK_SETS:
            args += ["--set", s]
    return args


def test_every_readme_command_runs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = readme_commands()
    assert len(commands) >= 30, len(commands)
    work = tmp_path / "fresh"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "configs").symlink_to(REPO / "configs")      # the README's config files, as in a checkout
    ran = []
    for line, marker in commands:
        t0 = time.perf_counter()
        args = shlex.split(line)
        if marker == CUDA:
            assert "--device" in args and "cuda" in args, line
            continue                      # listed: needs a CUDA GPU, which CI does not have
        if args[0] == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", *args[1:args.index("-m")], "-m", "medistill",
                   *shrink(args[args.index("-m") + 2:])]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            assert p.returncode == 0, f"{line}\n{p.stderr[-2000:]}"
            ran.append(line)
            continue
        p = run_cli(*shrink(args[1:]))
        said = " ".join((p.stdout + p.stderr).split())
        if marker == YOURS:
            assert p.returncode == 2 and ("not found" in said or "nothing at" in said or "No such file" in said), \
                f"{line}: a missing file of the user's must be named (exit {p.returncode}): {said[-600:]}"
            continue
        assert p.returncode == 0, f"{line}\n(exit {p.returncode}) {said[-2500:]}"
        ran.append(line)
        print(f"{time.perf_counter() - t0:6.1f} s  {line}")
    # what the path made is what the README says it makes
    assert (work / "runs" / "dkd" / "alone" / "summary.json").is_file()
    assert (work / "runs" / "audit" / "audit.json").is_file() and (work / "runs" / "audit" / "label_issues.csv").is_file()
    assert list((work / "runs" / "dkd" / "students" / "student").glob("*.onnx"))
    assert (work / "runs" / "x" / "summary.json").is_file()
    assert len(ran) >= 25, ran
    split = json.loads((work / "runs" / "kd_ens" / "split.json").read_text())   # the teacher's data and names
    assert split["source"].endswith("isic8_64.npz") and split["class_names"][3] == "melanoma"
    assert "Did distillation help?" in (work / "report.html").read_text()
    other = tmp_path / "another_folder"      # a run is usable from any folder
    other.mkdir()
    monkeypatch.chdir(other)
    p = run_cli("explain", str(work / "runs" / "dkd"), "--per-class", "1", "--methods", "gradcam", "--out", "ex")
    assert p.returncode == 0 and (other / "ex" / "explain.json").is_file(), p.stderr[-1500:]
