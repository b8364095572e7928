"""Teacher ensembles, bring-your-own teachers and the size-dependent small-input stem."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_CNN, run_cli, run_engine, tiny_cfg, write_npz
from medistill.errors import ConfigError, ModelError
from medistill.models import create_model, save_model_dir
from medistill.models.ensemble import EnsembleModel
from medistill.rundir import load_ensemble, write_ensemble
from medistill.models.factory import ModelSpecRecord, Preprocess

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--set", "students.0.kwargs={widths: [4, 4, 8, 8, 8]}", "--set", "train.latency=false",
         "--set", "train.progress=false"]


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    p = run_cli(*args)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    p.stderr = " ".join(p.stderr.split())   # rich wraps long error lines
    return p


class _Fixed(nn.Module):
    """Returns the same logits for every sample."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.z = nn.Parameter(torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z.expand(x.shape[0], -1)


def _pre() -> Preprocess:
    return Preprocess(3, 3, 4, (0.0,) * 3, (1.0,) * 3)


def test_prob_mean_by_hand() -> None:
    # p1 = (0.25, 0.75), p2 = (0.75, 0.25): the mean is (0.5, 0.5), so both outputs are log 0.5.
    ens = EnsembleModel([(_pre(), _Fixed([0.0, math.log(3)])), (_pre(), _Fixed([math.log(3), 0.0]))])
    out = ens(torch.rand(2, 3, 4, 4))
    assert torch.allclose(out, torch.full((2, 2), math.log(0.5)), atol=1e-6)
    # logit mean of (0, ln 3) and (ln 3, 0) is (ln 3 / 2, ln 3 / 2)
    ens = EnsembleModel([(_pre(), _Fixed([0.0, math.log(3)])), (_pre(), _Fixed([math.log(3), 0.0]))], "logit_mean")
    assert torch.allclose(ens(torch.rand(1, 3, 4, 4)), torch.full((1, 2), math.log(3) / 2), atol=1e-6)


def test_prob_mean_matches_naive_and_survives_confident_members() -> None:
    torch.manual_seed(0)
    members = [(_pre(), _Fixed(torch.randn(5).mul(3).tolist())) for _ in range(3)]
    ens = EnsembleModel(members)
    naive = torch.stack([torch.softmax(m.z, -1) for _, m in members]).mean(0)
    assert torch.allclose(torch.softmax(ens(torch.rand(1, 3, 4, 4)), -1)[0], naive, atol=1e-6)
    # Members whose probabilities underflow in float32 still give finite log-probabilities.
    ens = EnsembleModel([(_pre(), _Fixed([0.0, 200.0])), (_pre(), _Fixed([0.0, 300.0]))])
    assert torch.isfinite(ens(torch.rand(1, 3, 4, 4))).all()
    with pytest.raises(ModelError, match="aggregation"):
        EnsembleModel(members, "median")


def _model_dir(path: Path, num_classes: int, names: list[str]) -> Path:
    m = create_model("cnn5", num_classes, 3, 16, **TINY_CNN)
    spec = ModelSpecRecord(arch="cnn5", num_classes=num_classes, in_chans=3, data_chans=3, input_size=16,
                           small_input="auto", mean=[0.5] * 3, std=[0.5] * 3, class_names=names, kwargs=TINY_CNN)
    save_model_dir(path, m, spec)
    return path


def test_write_ensemble_checks_members(tmp_path: Path) -> None:
    a = _model_dir(tmp_path / "a", 3, ["x", "y", "z"])
    b = _model_dir(tmp_path / "b", 3, ["x", "y", "z"])
    c = _model_dir(tmp_path / "c", 4, ["x", "y", "z", "w"])
    with pytest.raises(ModelError, match="disagree on the classes"):
        write_ensemble(tmp_path / "e", [a, c])
    with pytest.raises(ModelError, match="at least 2"):
        write_ensemble(tmp_path / "e", [a])
    rec = write_ensemble(tmp_path / "e", [a, b])
    assert [r["model_dir"] for r in rec["members"]] == ["../a", "../b"]
    _ens, _specs, digest, _ = load_ensemble(tmp_path / "e")
    assert len(digest) == 64
    # A member retrained after the ensemble was written is refused, not silently used.
    _model_dir(tmp_path / "b", 3, ["x", "y", "z"])
    with pytest.raises(ModelError, match="changed since the ensemble was written"):
        load_ensemble(tmp_path / "e")


def test_train_seeds_ensemble_and_distill_from_it(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    ens = tmp_path / "ens"
    cli("train", "--data", str(npz), "--model", "cnn5", "--epochs", "1", "--seeds", "0,1", "--out", str(ens), *SMALL)
    rec = json.loads((ens / "ensemble.json").read_text())
    assert [r["model_dir"] for r in rec["members"]] == ["seed-0/students/student", "seed-1/students/student"]
    assert json.loads((ens / "seed-1" / "run_info.json").read_text())["seed"] == 1
    # The ensemble's test predictions are the mean of its members' probabilities.
    def probs(p: Path) -> torch.Tensor:
        rows = list(csv.DictReader(p.open()))
        return torch.tensor([[float(r[k]) for k in r if k.startswith("prob_")] for r in rows])
    mean = (probs(ens / "seed-0/students/student/predictions_test.csv")
            + probs(ens / "seed-1/students/student/predictions_test.csv")) / 2
    assert torch.allclose(probs(ens / "predictions_test.csv"), mean, atol=2e-6)
    m = json.loads((ens / "metrics.json").read_text())
    assert set(m["members"]) == {"seed-0/students/student", "seed-1/students/student"}
    assert "ensemble (prob_mean)" in (ens / "summary.md").read_text()

    out = tmp_path / "kd"
    cli("distill", "--teacher", str(ens), "--method", "kd", "--data", str(npz), "--model", "cnn5", "--epochs", "1",
        "--out", str(out), "--set", "data.augment=flip", *SMALL)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["test"]["balanced_accuracy"] == pytest.approx(m["test"]["balanced_accuracy"])
    info = json.loads((out / "run_info.json").read_text())
    assert info["teachers"]["teacher"]["sha256"] == load_ensemble(ens)[2]

    bad = cli("train", "--data", str(npz), "--model", "cnn5", "--seeds", "0,0", "--out", str(tmp_path / "x"), ok=False)
    assert bad.returncode == 2 and "repeats seed" in bad.stderr
    bad = cli("train", "--data", str(npz), "--model", "cnn5", "--seeds", "0,1", "--out", str(ens), *SMALL, ok=False)
    assert bad.returncode == 2 and "already exists" in bad.stderr and "--resume" in bad.stderr
    # --resume keeps finished members and only rewrites the ensemble files.
    before = (ens / "seed-0/students/student/model.safetensors").stat().st_mtime_ns
    cli("train", "--data", str(npz), "--model", "cnn5", "--epochs", "1", "--seeds", "0,1", "--out", str(ens),
        "--resume", *SMALL)
    assert (ens / "seed-0/students/student/model.safetensors").stat().st_mtime_ns == before


def test_feature_term_on_ensemble_is_refused(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz", size=32)
    a = run_engine(tiny_cfg(npz, tmp_path / "a", epochs=1)).out
    b = run_engine(tiny_cfg(npz, tmp_path / "b", epochs=1, seed=1)).out
    write_ensemble(tmp_path / "e", [a, b])
    cfg = tiny_cfg(npz, tmp_path / "s", epochs=1)
    cfg["teachers"] = [{"name": "ens", "checkpoint": str(tmp_path / "e")}]
    cfg["terms"] = [{"type": "ce"}, {"type": "fitnet", "student_tap": "conv3", "teacher_tap": "conv3"}]
    with pytest.raises(ConfigError, match="teacher ensemble"):
        run_engine(cfg)


def test_timm_checkpoint_with_namespace_as_teacher(tmp_path: Path) -> None:
    """timm's train.py stores the parsed arguments (argparse.Namespace) beside the weights."""
    npz = write_npz(tmp_path / "d.npz", size=28)
    model = create_model("resnet18", 3, 3, 28)
    ckpt = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet18", "args": argparse.Namespace(model="resnet18", lr=0.1),
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "metric": 0.5}, ckpt)
    out = tmp_path / "s"
    # weights trained with medistill's small-input stem: the stem is never adapted unless asked
    bad = cli("distill", "--teacher", f"resnet18={ckpt}", "--method", "kd", "--data", str(npz), "--model", "cnn5",
              "--epochs", "1", "--out", str(out), *SMALL, ok=False)
    assert bad.returncode == 2 and "conv1.weight" in bad.stderr and "small_input=on" in bad.stderr
    stem = ["--set", "teachers.0.small_input=on", "--set", "teachers.0.input_size=28"]
    cli("distill", "--teacher", f"resnet18={ckpt}", "--method", "kd", "--data", str(npz), "--model", "cnn5",
        "--epochs", "1", "--out", str(out), "--set", "data.augment=none", *stem, *SMALL)
    cfg = (out / "config.yaml").read_text()
    assert "model: resnet18" in cfg and "model_best.pth.tar" in cfg
    # A weights file for another class count names the first mismatching key.
    other = create_model("resnet18", 5, 3, 28)
    torch.save({"state_dict": other.state_dict(), "args": argparse.Namespace(a=1)}, tmp_path / "five.pth.tar")
    bad = cli("distill", "--teacher", f"resnet18={tmp_path / 'five.pth.tar'}", "--method", "kd", "--data", str(npz),
              "--model", "cnn5", "--epochs", "1", "--out", str(tmp_path / "t"), *stem, *SMALL, ok=False)
    assert bad.returncode == 2 and "shape mismatch at fc" in bad.stderr and "Traceback" not in bad.stderr


def test_model_flag_keeps_student_overrides(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    out = tmp_path / "r"
    cli("train", "--data", str(npz), "--model", "cnn5", "--epochs", "1", "--out", str(out), *SMALL,
        "--set", "students.0.norm=imagenet")
    import yaml

    st = yaml.safe_load((out / "config.yaml").read_text())["students"][0]
    assert st["norm"] == "imagenet" and st["kwargs"] == {"widths": [4, 4, 8, 8, 8]}


def _last_map(m: nn.Module, size: int) -> tuple[int, int]:
    return tuple(m.forward_features(torch.zeros(1, 3, size, size)).shape[-2:])


def test_stem_keeps_pooling_from_48px() -> None:
    from medistill.models.cost import count_flops

    m64 = create_model("resnet18", 9, 3, 64).eval()
    assert _last_map(m64, 64) == (4, 4) and "maxpool kept" in m64.medistill_adaptation
    m28 = create_model("resnet18", 9, 3, 28).eval()
    assert _last_map(m28, 28) == (4, 4) and "maxpool removed" in m28.medistill_adaptation
    s8 = create_model("resnet18", 9, 3, 64, small_input="stride8").eval()
    assert _last_map(s8, 64) == (8, 8)
    assert count_flops(s8, (1, 3, 64, 64)) > 3.5 * count_flops(m64, (1, 3, 64, 64))
    s16 = create_model("resnet18", 9, 3, 32, small_input="stride16").eval()
    assert _last_map(s16, 32) == (2, 2)
    d64 = create_model("densenet121", 9, 3, 64).eval()
    assert _last_map(d64, 64) == (4, 4)
    c64 = create_model("convnext_atto", 9, 3, 64).eval()
    assert _last_map(c64, 64) == (4, 4)


def test_atomic_writes_get_ordinary_permissions(tmp_path: Path) -> None:
    from medistill.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644


def test_mmd2_keeps_float64() -> None:
    from medistill.losses import mmd2

    torch.manual_seed(0)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    v = mmd2(x, y, sigmas=(0.001, 1.0))
    assert v.dtype == torch.float64
    # naive float64 reference
    xn, yn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(a, b).pow(2).clamp_min(1e-12)
        return sum(torch.exp(-d / (2 * s * s)) for s in (0.001, 1.0))
    ref = (k(xn, xn).mean() + k(yn, yn).mean() - 2 * k(xn, yn).mean()).clamp_min(0)
    assert torch.allclose(v, ref, rtol=1e-9, atol=1e-12)
    assert mmd2(x.bfloat16(), y.bfloat16()).dtype == torch.float32


def test_python_api_with_an_in_memory_teacher(tmp_path: Path) -> None:
    from medistill import api
    from medistill.models import load_model_dir

    npz = write_npz(tmp_path / "d.npz")
    cfg = {"data": {"augment": "flip"}, "students": [{"kwargs": TINY_CNN}],
           "train": {"latency": False, "progress": False, "batch_size": 16}}
    t = api.train(data=str(npz), model="cnn5", epochs=1, out=tmp_path / "t", config=cfg, quiet=True)
    assert t.out == tmp_path / "t" and 0.0 <= t.metrics["test"]["balanced_accuracy"] <= 1.0
    module, _pre, _spec = load_model_dir(t.out / "students" / "student")
    run = api.distill([module], data=str(npz), model="cnn5", method="kd", epochs=1, out=tmp_path / "s",
                            config=cfg, quiet=True)
    info = json.loads((run.out / "run_info.json").read_text())
    assert info["teachers"]["teacher"]["checkpoint"] == "<memory>" and len(info["teachers"]["teacher"]["sha256"]) == 64
    assert not any(p.requires_grad for p in module.parameters())
    assert set(run.students) == {"student"}
    # The same teacher from its run directory gives the same teacher row.
    run2 = api.distill([t.out], data=str(npz), model="cnn5", method="kd", epochs=1, out=tmp_path / "s2",
                             config=cfg, quiet=True)
    rows = [json.loads((r.out / "summary.json").read_text())["teacher"]["test"] for r in (run, run2)]
    assert rows[0]["balanced_accuracy"] == pytest.approx(rows[1]["balanced_accuracy"])
    with pytest.raises(ModelError, match="expected \\[B, 3\\] logits"):
        api.distill([nn.Sequential(nn.Flatten(), nn.LazyLinear(4))], data=str(npz), model="cnn5", epochs=1,
                          out=tmp_path / "bad", config=cfg, quiet=True)
    # a module that cannot take the images at all is named with the shape it was given
    with pytest.raises(ModelError, match="teacher 'teacher' \\(in-memory Linear\\) cannot take this data's images "
                                         "\\[B, 3, 16, 16\\] \\(RuntimeError: mat1 and mat2 shapes"):
        api.distill([nn.Linear(10, 5)], data=str(npz), model="cnn5", epochs=1, out=tmp_path / "bad2", config=cfg,
                    quiet=True)
    with pytest.raises(ConfigError, match="unlabeled=: expected the path of a folder of images.*got Tensor"):
        api.distill([module], data=str(npz), model="cnn5", epochs=1, out=tmp_path / "bad3", config=cfg, quiet=True,
                    unlabeled=torch.zeros(4, 3, 16, 16))
    assert not (tmp_path / "bad2").exists() and not (tmp_path / "bad3").exists()


def test_pretrained_without_network_names_the_local_form() -> None:
    """HF_HUB_OFFLINE=1 (set for every test) stands in for a machine without network."""
    with pytest.raises(ModelError, match="Pass a local weights file as pretrained=PATH"):
        create_model("resnet18", 3, 3, 32, pretrained=True)
