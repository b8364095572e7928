"""The bad-input probe (hardening, second round): what a new user might hand each command, and
what must happen — a one-line error with exit code 2 (or success where the input is fine), never
an internal error with a crash log, and never a change to a file the user already had.

Each case builds its inputs in a fresh folder, runs the command line in-process, and checks the
outcome against every file that existed before it ran (byte for byte)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import run_cli, write_npz

Case = Callable[[Path, dict[str, Path]], list[str]]


def _text(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _npz_bytes_truncated(d: Path) -> Path:
    good = write_npz(d / "good.npz")
    return _text(d / "cut.npz", good.read_bytes()[:300])


def _npz_keys_missing(d: Path) -> Path:
    np.savez(d / "nokeys.npz", something=np.zeros(3))
    return d / "nokeys.npz"


def _npz_bad_shape(d: Path) -> Path:
    np.savez(d / "flat.npz", train_images=np.zeros(10, np.uint8), train_labels=np.zeros(10, np.int64),
             val_images=np.zeros(4, np.uint8), val_labels=np.zeros(4, np.int64),
             test_images=np.zeros(4, np.uint8), test_labels=np.zeros(4, np.int64))
    return d / "flat.npz"


def _npz_labels_2d_wrong(d: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(d / "mismatch.npz", train_images=rng.integers(0, 255, (10, 16, 16, 3), dtype=np.uint8),
             train_labels=np.zeros(7, np.int64), val_images=rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8),
             val_labels=np.zeros(4, np.int64), test_images=rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8),
             test_labels=np.zeros(4, np.int64))
    return d / "mismatch.npz"


def _csv(d: Path, body: bytes) -> Path:
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / f"im{i}.png")
    return _text(d / "m.csv", body)


TRAIN = ["train", "--model", "cnn5", "--epochs", "1", "--set", "students.0.kwargs={widths: [4, 4, 8, 8, 8]}",
         "--set", "train.latency=false"]


def _train(data: str | Path, d: Path, *more: str) -> list[str]:
    return [*TRAIN, "--data", str(data), "--out", str(d / "out"), *more]


def _copy_run(run: Path, d: Path) -> Path:
    dst = d / "run"
    shutil.copytree(run, dst)
    return dst


CASES: dict[str, Case] = {
    # data files
    "npz: a text file named .npz": lambda d, r: _train(_text(d / "t.npz", "hello"), d),
    "npz: truncated": lambda d, r: _train(_npz_bytes_truncated(d), d),
    "npz: no image/label keys": lambda d, r: _train(_npz_keys_missing(d), d),
    "npz: 1-D images": lambda d, r: _train(_npz_bad_shape(d), d),
    "npz: fewer labels than images": lambda d, r: _train(_npz_labels_2d_wrong(d), d),
    "data: path does not exist": lambda d, r: _train(d / "nope.npz", d),
    "data: an empty folder": lambda d, r: _train((d / "empty").mkdir() or d / "empty", d),
    "data: an unknown extension": lambda d, r: _train(_text(d / "x.parquet", "x"), d),
    "csv: Latin-1 bytes": lambda d, r: _train(_csv(d, "path,label\nim0.png,caf\xe9\nim1.png,b\n".encode("latin-1")), d),
    "csv: binary garbage": lambda d, r: _train(_csv(d, bytes(range(256)) * 4), d),
    "csv: empty label cell": lambda d, r: _train(_csv(d, b"path,label\nim0.png,a\nim1.png,\nim2.png,b\nim3.png,a\n"), d),
    "csv: missing image files": lambda d, r: _train(_csv(d, b"path,label\nnope0.png,a\nnope1.png,b\n"), d),
    "csv: header only": lambda d, r: _train(_csv(d, b"path,label\n"), d),
    # flags
    "--epochs 0": lambda d, r: [*_train(r["npz"], d), "--epochs", "0"],
    "--epochs -3": lambda d, r: [*_train(r["npz"], d), "--epochs", "-3"],
    "--epochs abc": lambda d, r: [*_train(r["npz"], d), "--epochs", "abc"],
    "--input-size 0": lambda d, r: [*_train(r["npz"], d), "--input-size", "0"],
    "--input-size 100000": lambda d, r: [*_train(r["npz"], d), "--input-size", "100000"],
    "--model that does not exist": lambda d, r: [*_train(r["npz"], d), "--model", "resnet9999"],
    "--set a misspelt key": lambda d, r: [*_train(r["npz"], d), "--set", "trian.epochs=1"],
    "--set a word for a number": lambda d, r: [*_train(r["npz"], d), "--set", "train.batch_size=many"],
    "--set broken YAML": lambda d, r: [*_train(r["npz"], d), "--set", "students=[{name: a"],
    "--set without '='": lambda d, r: [*_train(r["npz"], d), "--set", "train.epochs"],
    "--out is an existing file": lambda d, r: [*TRAIN, "--data", str(r["npz"]), "--out", str(_text(d / "f.txt", "mine"))],
    "--out holds the user's files": lambda d, r: [*TRAIN, "--data", str(r["npz"]),
                                                 "--out", str(_text(d / "mine" / "metrics.json", "{}").parent)],
    "--out is empty": lambda d, r: [*TRAIN, "--data", str(r["npz"]), "--out", ""],
    # config files
    "config: does not exist": lambda d, r: ["train", str(d / "nope.yaml")],
    "config: a YAML list": lambda d, r: ["train", str(_text(d / "c.yaml", "- 1\n- 2\n"))],
    "config: empty": lambda d, r: ["train", str(_text(d / "c.yaml", ""))],
    "config: python tag (never executed)": lambda d, r: [
        "train", str(_text(d / "c.yaml", "data: !!python/object/apply:os.system ['touch PWNED']\n"))],
    "config: binary": lambda d, r: ["train", str(_text(d / "c.yaml", bytes(range(256))))],
    # teachers
    "--teacher a missing folder": lambda d, r: ["distill", "--data", str(r["npz"]), "--teacher", str(d / "nope"),
                                               "--model", "cnn5", "--out", str(d / "o")],
    "--teacher ARCH= (no file)": lambda d, r: ["distill", "--data", str(r["npz"]), "--teacher", "resnet18=",
                                              "--model", "cnn5", "--out", str(d / "o")],
    "--teacher ARCH=a text file": lambda d, r: ["distill", "--data", str(r["npz"]), "--teacher",
                                               f"resnet18={_text(d / 'w.pt', 'not weights')}", "--model", "cnn5",
                                               "--out", str(d / "o")],
    "--teacher is the data file": lambda d, r: ["distill", "--data", str(r["npz"]), "--teacher", str(r["npz"]),
                                               "--model", "cnn5", "--out", str(d / "o")],
    "--teacher trained on other classes": lambda d, r: [
        "distill", "--data", str(write_npz(d / "four.npz", counts=(20, 20, 20, 20))), "--teacher", str(r["run"]),
        "--model", "cnn5", "--out", str(d / "o"), "--epochs", "1"],
    "distill: --method unknown": lambda d, r: ["distill", "--teacher", str(r["run"]), "--method", "kdd",
                                              "--model", "cnn5", "--out", str(d / "o")],
    # finished runs
    "evaluate: a missing folder": lambda d, r: ["evaluate", str(d / "nope")],
    "evaluate: a folder that is not a run": lambda d, r: ["evaluate", str((d / "x").mkdir() or d / "x")],
    "evaluate: summary.json truncated": lambda d, r: ["evaluate", str(_corrupt(_copy_run(r["run"], d), "summary.json"))],
    "evaluate: split.json missing": lambda d, r: ["evaluate", str(_remove(_copy_run(r["run"], d), "split.json"))],
    "evaluate: external data with other classes": lambda d, r: [
        "evaluate", str(_copy_run(r["run"], d)), "--data", str(write_npz(d / "four.npz", counts=(9, 9, 9, 9)))],
    "report: a missing run": lambda d, r: ["report", str(d / "nope"), "--out", str(d / "r.html")],
    "report: metrics.jsonl garbage": lambda d, r: ["report", str(_corrupt(_copy_run(r["run"], d), "metrics.jsonl")),
                                                  "--out", str(d / "r.html")],
    "resume: a folder that is not a run": lambda d, r: [*_train(r["npz"], d), "--resume"],
    "export: --out is an existing file": lambda d, r: ["export", str(_copy_run(r["run"], d)), "--out",
                                                      str(_text(d / "model.onnx", "mine"))],
    "export: a missing run": lambda d, r: ["export", str(d / "nope"), "--out", str(d / "e")],
    "predict: a garbage image": lambda d, r: ["predict", str(_copy_run(r["run"], d)), str(_text(d / "x.png", "no"))],
    "predict: an image that does not exist": lambda d, r: ["predict", str(_copy_run(r["run"], d)), str(d / "no.png")],
    "predict: a garbage ONNX model": lambda d, r: ["predict", str(_text(d / "m.onnx", b"\x00garbage")),
                                                  str(_png(d / "a.png"))],
    "explain: an unknown method": lambda d, r: ["explain", str(_copy_run(r["run"], d)), "--method", "nosuchcam"],
    "ensemble: one member missing": lambda d, r: ["ensemble", str(_copy_run(r["run"], d)), str(d / "nope"),
                                                 "--out", str(d / "ens")],
}


# What a case may change, and why: evaluating a run on its own splits re-scores it and refreshes
# its metrics files (the command's documented job); nothing else may change.
MAY_CHANGE = {"evaluate: summary.json truncated": {"run/metrics.json", "run/students/student/metrics.json"}}


def _corrupt(run: Path, name: str) -> Path:
    p = run / name
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)] + b"\x00{")
    return run


def _remove(run: Path, name: str) -> Path:
    (run / name).unlink()
    return run


def _png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def resources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("probe")
    npz = write_npz(d / "tiny.npz")
    p = run_cli(*TRAIN, "--data", str(npz), "--out", str(d / "run"))
    assert p.returncode == 0, p.stderr[-2000:]
    return {"npz": npz, "run": d / "run"}


outcomes: dict[str, int] = {}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, resources: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "case"
    work.mkdir()
    monkeypatch.chdir(work)
    args = CASES[name](work, resources)
    before = _snapshot(work)
    shared = _snapshot(resources["run"].parent)
    p = run_cli(*args)
    said = p.stdout + p.stderr
    outcomes[name] = p.returncode
    assert p.returncode != 1 and "internal error" not in said and "Traceback" not in said, f"{name}: {said[-1500:]}"
    assert p.returncode in (0, 2), f"{name}: exit {p.returncode}: {said[-800:]}"
    if p.returncode == 2:
        assert "error" in said.lower(), f"{name}: refused without saying why: {said[-800:]}"
    after = _snapshot(work)
    changed = [f for f, h in before.items() if after.get(f) != h and f not in MAY_CHANGE.get(name, set())]
    assert not changed, f"{name}: changed or removed the user's files {changed}"
    assert _snapshot(resources["run"].parent) == shared, f"{name}: touched the shared run"
    assert not (work / "PWNED").exists()


def test_probe_outcomes_are_recorded(tmp_path: Path) -> None:
    """The probe's size is what docs/reliability.md states (keeps the doc honest)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert f"{len(CASES)} bad inputs" in doc, json.dumps(len(CASES))
