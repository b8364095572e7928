"""The README is a contract: every command of its "Using it" block runs as written, in order,
with only the size-shrinking settings of ``shrink`` (fewer epochs, images, pixels and seeds; a
transformer at 64 px instead of 224). Lines the README marks `# needs your files`
must refuse with exit code 2 naming the missing file; `# needs a CUDA GPU` lines are listed here
with the reason and not run on a machine without one.

The commands fall into independent paths: a command joins the path of every earlier command
whose run folder (``runs/NAME``, also inside the config files it names) it reads or writes. Each
path runs in order in its own fresh folder, so the paths run in parallel (pytest -n); the static
test below checks what makes that equal to one folder top to bottom — every run a command reads
is made earlier on its path, and no two paths write the same run folder.

Not run here, with the reason: the quickstart's `make test` (it is this suite) and `make demo`
(its pipeline runs in test_cli.py::test_demo_quick with --quick); `export MEDISTILL_DATA_DIR=…`
(a shell line: the suite's conftest sets the variable the same way)."""

from __future__ import annotations

import json
import functools
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

pytestmark = pytest.mark.slow

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
REPO = Path(__file__).resolve().parents[1]
# What the test appends, and nothing else: fewer epochs, images and pixels (explain: one image per
# class and Score-CAM's top 8 channels).
SHRINK_SETS = ["data.subset.max_samples=40", "data.max_eval_samples=32", "train.latency=false",
               "train.progress=false", "eval.bootstrap=100"]
SMALL_INPUT = "16"         # --input-size for models that take any size (not transformers)
# A transformer is built for the size it is trained at (timm's img_size; its attention windows are
# clamped to small feature maps), so it is trained and fed at 64 instead of the README's 224.
TRANSFORMER_INPUT = "64"
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
    if command == "recipe":     # one seed per seeded stage instead of three (UMKD's two experts stay)
        args += ["--seeds", "0"]
    if command == "sweep" and "--seeds" in args:     # two seeds instead of three: still a mean ± std
        args[args.index("--seeds") + 1] = ",".join(args[args.index("--seeds") + 1].split(",")[:2])
    transformer = any(m in args for m in ("swin_tiny_patch4_window7_224",)) or "scalekd" in args
    if transformer and "--input-size" in args:
        args += ["--input-size", TRANSFORMER_INPUT]
    if transformer and "teachers.0.input_size=224" in args:
        args += ["--set", f"teachers.0.input_size={TRANSFORMER_INPUT}"]
    if command in ("train", "distill") and not resume and "--input-size" not in args and not transformer \
            and "--print-config" not in args and not any(a.endswith(".yaml") for a in args):
        args += ["--input-size", SMALL_INPUT]
    if not resume:
        for s in SHRINK_SETS:
            args += ["--set", s]
    return args


def _root(path: str) -> str | None:
    """``runs/NAME`` of a path under ``runs/`` (``alone=runs/x`` too), else None."""
    path = path.split("=", 1)[-1]
    parts = Path(path).parts
    return "/".join(parts[:2]) if len(parts) >= 2 and parts[0] == "runs" else None


def run_folders(args: list[str]) -> tuple[set[str], set[str]]:
    """(written, read): the run folders one command writes (``--out``, a config's ``out``) and
    reads (any other ``runs/…`` argument, a config's teacher checkpoints)."""
    written, read = set(), set()
    for k, a in enumerate(args):
        if a.endswith(".yaml") and (REPO / a).is_file():
            cfg = yaml.safe_load((REPO / a).read_text()) or {}
            if _root(str(cfg.get("out", ""))) and "--out" not in args:
                written.add(_root(cfg["out"]))
            read |= {_root(t.get("checkpoint", "")) for t in cfg.get("teachers") or []} - {None}
        elif _root(a):
            (written if k and args[k - 1] == "--out" else read).add(_root(a))
    if "--out" in args and "--resume" in args:    # a resume reads the run it extends
        read |= written
    return written, read - written if "--resume" not in args else read


@functools.cache
def paths() -> list[list[tuple[str, str]]]:
    """The commands grouped into independent paths, each in README order."""
    cmds = readme_commands()
    group = list(range(len(cmds)))

    def find(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i, (a, _m) in enumerate(cmds):
        wa, ra = run_folders(shlex.split(a))
        for j in range(i):
            wb, rb = run_folders(shlex.split(cmds[j][0]))
            if (wa | ra) & (wb | rb):
                group[find(i)] = find(j)
    out: dict[int, list[tuple[str, str]]] = {}
    for i, c in enumerate(cmds):
        out.setdefault(find(i), []).append(c)
    return list(out.values())


def test_the_paths_are_one_folder_top_to_bottom() -> None:
    cmds = readme_commands()
    assert len(cmds) >= 30, len(cmds)
    assert sorted(c for p in paths() for c in p) == sorted(cmds)
    written_by: dict[str, int] = {}
    for n, path in enumerate(paths()):
        made: set[str] = set()
        for line, marker in path:
            w, r = run_folders(shlex.split(line))
            assert marker == YOURS or r <= made, f"{line} reads {sorted(r - made)}, which no earlier command makes"
            made |= w
        for f in made:
            assert written_by.setdefault(f, n) == n, f"two paths write {f}"
    assert len(paths()) >= 5     # the split that lets them run side by side


def run_path(path: list[tuple[str, str]], work: Path) -> list[str]:
    """Every command of one path, in order, in ``work``; the lines that ran."""
    ran = []
    for line, marker in path:
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
    return ran


# What the paths made is what the README says they make (checked on the path that makes it).
MADE = {
    "runs/dkd": ["runs/dkd/alone/summary.json", "runs/dkd/students/student/*.onnx", "report.html"],
    "runs/audit": ["runs/audit/audit.json", "runs/audit/label_issues.csv"],
    "runs/x": ["runs/x/summary.json"],
}


@pytest.mark.parametrize("n", range(len(paths())), ids=lambda n: paths()[n][0][0].split(" --out ")[-1].split()[0]
                         if " --out " in paths()[n][0][0] else f"path{n}")
def test_every_readme_command_runs_in_order(n: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "fresh"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "configs").symlink_to(REPO / "configs")      # the README's config files, as in a checkout
    path = paths()[n]
    ran = run_path(path, work)
    made = set().union(*(run_folders(shlex.split(line))[0] for line, _m in path))
    for root, files in MADE.items():
        if root in made:
            for f in files:
                assert list(work.glob(f)), f"{f} was not made"
    if "runs/kd_ens" in made:
        split = json.loads((work / "runs" / "kd_ens" / "split.json").read_text())   # the teacher's data and names
        assert split["source"].endswith("isic8_64.npz") and split["class_names"][3] == "melanoma"
        assert "Did distillation help?" in (work / "report.html").read_text()
        other = tmp_path / "another_folder"      # a run is usable from any folder
        other.mkdir()
        monkeypatch.chdir(other)
        p = run_cli("explain", str(work / "runs" / "dkd"), "--per-class", "1", "--methods", "gradcam", "--out", "ex")
        assert p.returncode == 0 and (other / "ex" / "explain.json").is_file(), p.stderr[-1500:]
    assert ran or all(m for _l, m in path), path
