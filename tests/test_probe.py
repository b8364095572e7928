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


def _npz_scalar_labels(d: Path) -> Path:
    arr = dict(np.load(write_npz(d / "good.npz")))
    arr["train_labels"] = np.array(3)
    np.savez(d / "scalar.npz", **arr)
    return d / "scalar.npz"


def _folder(d: Path, name: str, splits: tuple[str, ...] = ("",), size: tuple[int, int] = (8, 8)) -> Path:
    from PIL import Image

    root = d / name
    for k, split in enumerate(splits):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(4):
                Image.fromarray(np.full((size[1], size[0], 3), 20 * i + 60 * (c == "b") + 3 * k, np.uint8)).save(
                    root / split / c / f"{split or 'x'}{i}.png")
    return root


def _png_bomb(path: Path) -> Path:
    """A PNG whose header claims 50,000 × 50,000 pixels (a decompression bomb) in a few bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                     + chunk(b"IEND", b""))
    return path


def _bomb_folder(d: Path) -> Path:
    root = _folder(d, "bomb")
    _png_bomb(root / "a" / "huge.png")
    return root


def _ensemble_missing_member(d: Path, run: Path) -> Path:
    ens = d / "ens"
    assert run_cli("ensemble", str(run), str(run), "--out", str(ens)).returncode == 0
    js = json.loads((ens / "ensemble.json").read_text())
    js["members"][0]["model_dir"] = str(d / "gone")
    (ens / "ensemble.json").write_text(json.dumps(js))
    return ens


def _bare_tensor(d: Path) -> Path:
    import torch

    torch.save(torch.zeros(3), d / "bare.pt")
    return d / "bare.pt"


def _distill(r: dict[str, Path], d: Path) -> list[str]:
    return ["distill", "--teacher", str(r["run"]), "--method", "kd", "--model", "cnn5", "--epochs", "1",
            "--out", str(d / "o")]


def _pngs_of(npz: Path, split: str, folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    with np.load(npz) as z:
        for i, im in enumerate(z[f"{split}_images"][:4]):
            Image.fromarray(im).save(folder / f"{i}.png")
    return folder


def _cut_png(d: Path) -> Path:
    folder = _pngs_of(write_npz(d / "other.npz", seed=7), "train", d / "cut")
    png = folder / "0.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    return folder


def _bare_checkpoints(d: Path, run: Path) -> Path:
    import torch

    dst = _copy_run(run, d)
    for name in ("checkpoint_last.pt", "checkpoint_prev.pt"):
        torch.save(torch.zeros(3), dst / name)
    return dst


def _ensemble_row_without_dir(d: Path, run: Path) -> Path:
    ens = d / "ens"
    assert run_cli("ensemble", str(run), str(run), "--out", str(ens)).returncode == 0
    js = json.loads((ens / "ensemble.json").read_text())
    del js["members"][0]["model_dir"]
    (ens / "ensemble.json").write_text(json.dumps(js))
    return ens


def _pickle_in_model_json(d: Path, run: Path) -> Path:
    """A model.json whose kwargs name a torch file holding a pickled call (it must never run)."""
    import os

    import torch

    class Payload:
        def __reduce__(self):   # unpickling would run this: weights_only loading refuses it
            return (os.system, (f"touch {d / 'PWNED'}",))

    dst = _copy_run(run, d)
    torch.save({"w": Payload()}, dst / "evil.pt")
    meta = dst / "students" / "student" / "model.json"
    js = json.loads(meta.read_text())
    js["kwargs"]["pretrained"] = str(dst / "evil.pt")
    meta.write_text(json.dumps(js))
    return dst


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
                                               "--model", "cnn5", "--out", str(d / "o"), "--method", "kd"],
    "--teacher ARCH= (no file)": lambda d, r: ["distill", "--data", str(r["npz"]), "--teacher", "resnet18=",
                                              "--model", "cnn5", "--out", str(d / "o"), "--method", "kd"],
    "--teacher ARCH=a text file": lambda d, r: ["distill", "--data", str(r["npz"]), "--teacher",
                                               f"resnet18={_text(d / 'w.pt', 'not weights')}", "--model", "cnn5",
                                               "--out", str(d / "o"), "--method", "kd"],
    "--teacher is the data file": lambda d, r: ["distill", "--data", str(r["npz"]), "--teacher", str(r["npz"]),
                                               "--model", "cnn5", "--out", str(d / "o"), "--method", "kd"],
    "--teacher trained on other classes": lambda d, r: [
        "distill", "--data", str(write_npz(d / "four.npz", counts=(20, 20, 20, 20))), "--teacher", str(r["run"]),
        "--model", "cnn5", "--out", str(d / "o"), "--epochs", "1", "--method", "kd"],
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
    "explain: an unknown method": lambda d, r: ["explain", str(_copy_run(r["run"], d)), "--methods", "nosuchcam"],
    "ensemble: one member missing": lambda d, r: ["ensemble", str(_copy_run(r["run"], d)), str(d / "nope"),
                                                 "--out", str(d / "ens")],
    # third round (issue 34) and the unlabelled images, the audit
    "npz: labels a scalar": lambda d, r: _train(_npz_scalar_labels(d), d),
    "folder: a decompression bomb": lambda d, r: _train(_bomb_folder(d), d),
    "folder: val/ and valid/": lambda d, r: _train(_folder(d, "vv", ("train", "val", "valid", "test")), d),
    "folder: non-square images": lambda d, r: _train(_folder(d, "ns", size=(16, 8)), d),
    "--set a list index that is a word": lambda d, r: [*_train(r["npz"], d), "--set", "students.first.model=cnn5"],
    "--input-size -1": lambda d, r: [*_train(r["npz"], d), "--input-size", "-1"],
    "--input-size 3": lambda d, r: [*_train(r["npz"], d), "--input-size", "3"],
    "--teacher an ensemble without a member": lambda d, r: [
        "distill", "--teacher", str(_ensemble_missing_member(d, r["run"])), "--model", "cnn5", "--out", str(d / "o"),
        "--method", "kd"],
    "--teacher ARCH=a bare tensor": lambda d, r: ["distill", "--data", str(r["npz"]), "--teacher",
                                                 f"resnet18={_bare_tensor(d)}", "--model", "cnn5", "--out",
                                                 str(d / "o"), "--method", "kd"],
    "explain: an unknown split": lambda d, r: ["explain", str(_copy_run(r["run"], d)), "--split", "nosuch"],
    "explain: zero images": lambda d, r: ["explain", str(_copy_run(r["run"], d)), "--images", "0"],
    "evaluate: config.yaml missing": lambda d, r: ["evaluate", str(_remove(_copy_run(r["run"], d), "config.yaml"))],
    "--unlabeled a class-folder tree": lambda d, r: [
        "distill", "--teacher", str(r["run"]), "--method", "kd", "--model", "cnn5", "--out", str(d / "o"),
        "--unlabeled", str(_folder(d, "tree"))],
    "--unlabeled a CSV with labels": lambda d, r: [
        "distill", "--teacher", str(r["run"]), "--method", "kd", "--model", "cnn5", "--out", str(d / "o"),
        "--unlabeled", str(_csv(d, b"path,label\nim0.png,a\n"))],
    "--label-fraction 0": lambda d, r: [*_train(r["npz"], d), "--label-fraction", "0"],
    "audit: a missing dataset": lambda d, r: ["audit", str(d / "nope.npz")],
    # fourth round (issue 47): the unlabelled images, the audit, checkpoints and files that are not medistill's
    "--unlabeled the test images saved as PNG files": lambda d, r: [*_distill(r, d), "--unlabeled",
                                                                   str(_pngs_of(r["npz"], "test", d / "pngs"))],
    "--unlabeled a truncated .npz": lambda d, r: [*_distill(r, d), "--unlabeled", str(_npz_bytes_truncated(d))],
    "--unlabeled '' (an unset variable)": lambda d, r: [*_distill(r, d), "--unlabeled", ""],
    "--unlabeled an empty folder": lambda d, r: [*_distill(r, d), "--unlabeled",
                                                str((d / "empty").mkdir() or d / "empty")],
    "--unlabeled a folder with a truncated PNG": lambda d, r: [*_distill(r, d), "--unlabeled", str(_cut_png(d))],
    "audit: --oof 1000": lambda d, r: ["audit", str(_copy_run(r["run"], d)), "--oof", "1000", "--out", str(d / "a")],
    "audit: --run on other classes": lambda d, r: [
        "audit", str(write_npz(d / "four.npz", counts=(9, 9, 9, 9))), "--run", str(r["run"]), "--out", str(d / "a")],
    "audit: --out an existing file": lambda d, r: ["audit", str(_copy_run(r["run"], d)), "--out",
                                                  str(_text(d / "notes.txt", "mine"))],
    "resume: checkpoints that hold bare tensors": lambda d, r: [*TRAIN, "--out", str(_bare_checkpoints(d, r["run"])),
                                                              "--resume", "--epochs", "2"],
    "--set a list index as the last key": lambda d, r: [*_train(r["npz"], d), "--set", "students.first=cnn5"],
    "--set a list index out of range": lambda d, r: [*_train(r["npz"], d), "--set", "students.4.model=cnn5"],
    "ensemble: a member row without model_dir": lambda d, r: [
        "distill", "--teacher", str(_ensemble_row_without_dir(d, r["run"])), "--model", "cnn5", "--out", str(d / "o"),
        "--method", "kd"],
    "evaluate: model.json names a pickle as weights": lambda d, r: ["evaluate", str(_pickle_in_model_json(d, r["run"]))],
}


# Each case's exit code and a fragment of what it must say (whitespace-normalised, so rich's line
# wrapping does not matter): 2 with the reason for refusals, 0 with the note for accepted input.
EXPECT: dict[str, tuple[int, str]] = {
    "npz: a text file named .npz": (2, "not a .npz archive: not a zip archive"),
    "npz: truncated": (2, "truncated or another kind of file"),
    "npz: no image/label keys": (2, "missing arrays ['train_images'"),
    "npz: 1-D images": (2, "expected [N, H, W] or [N, H, W, C] images, got shape (10,)"),
    "npz: fewer labels than images": (2, "train_images and train_labels differ in length"),
    "data: path does not exist": (2, "dataset file not found"),
    "data: an empty folder": (2, "no class sub-folders found"),
    "data: an unknown extension": (2, "not a .npz/.csv file and not a folder"),
    "csv: Latin-1 bytes": (2, "not UTF-8 text (byte 0xe9"),
    "csv: binary garbage": (2, "not UTF-8 text (byte 0x80"),
    "csv: empty label cell": (2, "m.csv:3: empty label cell"),
    "csv: missing image files": (2, "m.csv:2: image not found"),
    "csv: header only": (2, "m.csv: no rows"),
    "--epochs 0": (2, "train.epochs: Input should be greater than or equal to 1 (got 0)"),
    "--epochs -3": (2, "train.epochs: Input should be greater than or equal to 1 (got -3)"),
    "--epochs abc": (2, "Invalid value for '--epochs'"),
    "--input-size 0": (2, "--input-size (input_size) 0 is out of range"),
    "--input-size 100000": (2, "--input-size (input_size) 100000 is out of range"),
    "--model that does not exist": (2, "unknown model 'resnet9999'. Did you mean"),
    "--set a misspelt key": (2, "trian: unknown key; did you mean 'train'?"),
    "--set a word for a number": (2, "train.batch_size: Input should be a valid integer"),
    "--set broken YAML": (2, "is not a valid YAML list/mapping"),
    "--set without '='": (2, "override 'train.epochs' must look like key.sub=value"),
    "--out is an existing file": (2, "f.txt is not writable"),
    "--out holds the user's files": (2, "holds other files (metrics.json) and no medistill run"),
    "--out is empty": (2, "the run directory (--out / out=) is empty"),
    "config: does not exist": (2, "config file not found"),
    "config: a YAML list": (2, "top level must be a mapping, got list"),
    "config: empty": (2, "c.yaml is empty"),
    "config: python tag (never executed)": (2, "could not determine a constructor for the tag"),
    "config: binary": (2, "not a UTF-8 text file"),
    "--teacher a missing folder": (2, "teacher checkpoint not found"),
    "--teacher ARCH= (no file)": (2, "expected ARCH=WEIGHTS_FILE with both parts"),
    "--teacher ARCH=a text file": (2, "w.pt: not a readable weights file"),
    "--teacher is the data file": (2, "tiny.npz is a npz file, not a model"),
    "--teacher trained on other classes": (2, "predicts 3 classes but the data has 4"),
    "distill: --method unknown": (2, "unknown method 'kdd'; available: kd"),
    "evaluate: a missing folder": (2, "nothing at"),
    "evaluate: a folder that is not a run": (2, "not a run, model or ensemble directory"),
    "evaluate: summary.json truncated": (0, "bal. ACC"),
    "evaluate: split.json missing": (2, "run/split.json is missing"),
    "evaluate: external data with other classes": (2, "predicts 3 classes; the data has 4"),
    "report: a missing run": (2, "no summary.json (not a finished medistill run)"),
    "report: metrics.jsonl garbage": (2, "metrics.jsonl:1: not a JSON line"),
    "resume: a folder that is not a run": (2, "--resume: no checkpoint_last.pt"),
    "export: --out is an existing file": (2, "model.onnx already exists; pass --force"),
    "export: a missing run": (2, "nothing at"),
    "predict: a garbage image": (2, "corrupt or unreadable image"),
    "predict: an image that does not exist": (2, "No such file or directory"),
    "predict: a garbage ONNX model": (2, "not a readable ONNX file"),
    "explain: an unknown method": (2, "unknown explanation method(s) ['nosuchcam']"),
    "ensemble: one member missing": (2, "teacher checkpoint not found"),
    "npz: labels a scalar": (2, "train_labels is a single value (3), not one label per image"),
    "folder: a decompression bomb": (2, "huge.png declares a size beyond PIL's safety limit"),
    "folder: val/ and valid/": (2, "has both val/ and valid/"),
    "folder: non-square images": (0, "images are not square (e.g. 16×8 px"),
    "--set a list index that is a word": (2, "students is a list; address its items by index (students.0.model)"),
    "--input-size -1": (2, "--input-size (input_size) -1 is out of range"),
    "--input-size 3": (2, "--input-size (input_size) 3 is out of range"),
    "--teacher an ensemble without a member": (2, "gone is missing"),
    "--teacher ARCH=a bare tensor": (2, "bare.pt: does not hold a state dict of tensors"),
    "explain: an unknown split": (2, "--split 'nosuch': explain a run's train, val or test split"),
    "explain: zero images": (2, "--images 0: explain at least one image"),
    "evaluate: config.yaml missing": (2, "run/config.yaml is missing"),
    "--unlabeled a class-folder tree": (2, "holds class-like sub-folders with images (a, b)"),
    "--unlabeled a CSV with labels": (2, "has a label column: labelled images go in --data"),
    "--label-fraction 0": (2, "data.label_fraction: Input should be greater than 0"),
    "audit: a missing dataset": (2, "dataset file not found"),
    "--unlabeled the test images saved as PNG files": (2, "unlabelled image(s) are copies of test images"),
    "--unlabeled a truncated .npz": (2, "cut.npz: not a readable .npz of arrays (BadZipFile"),
    "--unlabeled '' (an unset variable)": (2, "--unlabeled is an empty string (an unset shell variable?)"),
    "--unlabeled an empty folder": (2, "case/empty holds no images (.bmp"),
    "--unlabeled a folder with a truncated PNG": (2, "case/cut/0.png: image file is truncated"),
    "audit: --oof 1000": (2, "--oof 1000: each of the K folds needs an image of every class, and the smallest "
                             "training class has 10"),
    "audit: --run on other classes": (2, "its model predicts 3 classes but"),
    "audit: --out an existing file": (2, "case/notes.txt is a file; audit writes a folder"),
    "resume: checkpoints that hold bare tensors": (2, "checkpoint_last.pt is not a medistill checkpoint (it holds a "
                                                      "Tensor"),
    "--set a list index as the last key": (2, "students is a list; address its items by index (students.0)"),
    "--set a list index out of range": (2, "students has 1 item(s) (0…0); there is no item 4"),
    "ensemble: a member row without model_dir": (2, "member 0 has no model_dir"),
    "evaluate: model.json names a pickle as weights": (2, "evil.pt: holds pickled objects beyond tensors, which "
                                                          "medistill never unpickles"),
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


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, resources: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "case"
    work.mkdir()
    monkeypatch.chdir(work)
    args = CASES[name](work, resources)
    before = _snapshot(work)
    shared = _snapshot(resources["run"].parent)
    p = run_cli(*args)
    said = " ".join((p.stdout + p.stderr).split()).replace("│", "").replace("  ", " ")
    code, words = EXPECT[name]
    assert "internal error" not in said and "Traceback" not in said, f"{name}: {said[-1500:]}"
    assert p.returncode == code, f"{name}: exit {p.returncode}, expected {code}: {said[-800:]}"
    assert " ".join(words.split()) in said, f"{name}: expected {words!r} in: {said[-800:]}"
    if code == 2:   # medistill's "error: …" line, or the command-line parser's "Error" box
        assert "error" in said.lower(), f"{name}: refused without saying so: {said[-800:]}"
    after = _snapshot(work)
    changed = [f for f, h in before.items() if after.get(f) != h and f not in MAY_CHANGE.get(name, set())]
    assert not changed, f"{name}: changed or removed the user's files {changed}"
    assert _snapshot(resources["run"].parent) == shared, f"{name}: touched the shared run"
    assert not (work / "PWNED").exists()


def test_probe_outcomes_are_recorded(tmp_path: Path) -> None:
    """Every case has its pinned outcome, and the probe's size is what docs/reliability.md states."""
    assert set(EXPECT) == set(CASES), sorted(set(EXPECT) ^ set(CASES))
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert f"{len(CASES)} bad inputs" in doc, json.dumps(len(CASES))
