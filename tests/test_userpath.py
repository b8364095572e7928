"""A user's own path: their data, their teacher from elsewhere, their working directory, and the
answer to "did distillation help?" with a paired interval."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_CNN, run_engine, tiny_cfg, write_npz
from medistill.errors import ConfigError, DataError, ModelError, MedistillError

QUIET = ["train.progress=false", "train.latency=false", "eval.bootstrap=0"]


def _api_distill(teacher: Path, out: Path, **kw):
    from medistill.api import distill

    return distill([teacher], model="cnn5", epochs=1, out=out, quiet=True,
                   overrides=[*QUIET, f"students.0.kwargs.widths={TINY_CNN['widths']}"], **kw)


# --- runs describe themselves ------------------------------------------------------------------

def test_distill_without_data_takes_the_teachers_data_and_split(teachers: list[Path], tmp_path: Path) -> None:
    from medistill.assemble import assemble_run

    t_cfg = (teachers[0] / "config.yaml").read_text()
    cfg = assemble_run("distill", None, [("out", str(tmp_path / "kd"))], teachers=[str(teachers[0])], method="kd")
    assert cfg.data.name.endswith("tiny.npz") and cfg.data.name in t_cfg     # not the default RetinaMNIST
    run = _api_distill(teachers[0], tmp_path / "kd2")
    split_t = json.loads((teachers[0] / "split.json").read_text())
    split_s = json.loads((run.out / "split.json").read_text())
    assert split_s["test"] == split_t["test"] and split_s["fingerprint"] == split_t["fingerprint"]


def test_other_data_than_the_teachers_is_refused(teachers: list[Path], tmp_path: Path) -> None:
    other = write_npz(tmp_path / "other.npz", seed=7)      # same classes, other images
    with pytest.raises(ModelError, match="allow_other_data"):
        _api_distill(teachers[0], tmp_path / "kd", data=str(other))


def test_empty_strings_are_errors(tmp_path: Path) -> None:
    from medistill.cli import app

    r = CliRunner()
    for args, word in ((["train", "--data", "", "--out", str(tmp_path / "a")], "data"),
                       (["train", "--model", "", "--out", str(tmp_path / "b")], "student model name is empty"),
                       (["train", "--out", ""], "run directory"),
                       (["distill", "--teacher", "resnet18=", "--method", "kd", "--out", str(tmp_path / "c")], "ARCH=WEIGHTS_FILE")):
        res = r.invoke(app, args)
        assert isinstance(res.exception, ConfigError) and word in str(res.exception), (args, res.exception)
    assert not any(tmp_path.iterdir())     # nothing was created
    from medistill.api import train

    with pytest.raises(ConfigError, match="out=None"):
        train(data="x.npz", out=None)       # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="epochs must be an int"):
        train(data="x.npz", epochs="ten", out=tmp_path / "d")    # type: ignore[arg-type]


def test_paths_are_portable(tmp_path: Path) -> None:
    from medistill.rundir import portable_path, resolve_in_run

    run = tmp_path / "run"
    (run / "alone").mkdir(parents=True)
    (tmp_path / "t").mkdir()
    assert portable_path(str(run / "alone"), run) == "alone"
    assert portable_path(str(tmp_path / "t"), run) == str((tmp_path / "t").resolve())
    assert portable_path("retinamnist", run) == "retinamnist"        # a name, not a path
    assert resolve_in_run("alone", run) == str(run / "alone")
    assert resolve_in_run("retinamnist", run) == "retinamnist"


def test_run_opens_from_any_working_directory(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths at creation; evaluate and explain from another folder, and from a copy."""
    from medistill.api import distill, train
    from medistill.commands.evaluate import evaluate_target
    from medistill.explain.run import explain_run

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(data_dir / "tiny.npz", work / "tiny.npz")
    monkeypatch.chdir(work)
    ov = [*QUIET, f"students.0.kwargs.widths={TINY_CNN['widths']}"]
    train(data="tiny.npz", model="cnn5", epochs=1, out="runs/t", overrides=ov, quiet=True)
    distill(["runs/t"], model="cnn5", epochs=1, out="runs/kd", overrides=ov, quiet=True, baseline=True)
    saved = (work / "runs/kd/config.yaml").read_text()
    assert str((work / "runs/t").resolve()) in saved and str((work / "tiny.npz").resolve()) in saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = evaluate_target(work / "runs/kd", latency=False)
    assert "student" in res
    rep = explain_run(work / "runs/kd", 2, None, ["gradcam"], "test", None, out=elsewhere / "ex")
    assert set(rep["models"]) >= {"teacher", "student"}
    copy = tmp_path / "copied"
    shutil.copytree(work / "runs/kd", copy)
    shutil.rmtree(work / "runs/kd")
    assert evaluate_target(copy, latency=False)["student"]["test"]["n"] > 0
    assert json.loads((copy / "comparison.json").read_text())["alone_run"] == "alone"   # inside: relative


def test_bare_dataset_file_names_are_found_in_the_data_dir(data_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from medistill.data.sources import open_source

    monkeypatch.setenv("MEDISTILL_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    src = open_source("tiny.npz")
    assert Path(src.description) == data_dir / "tiny.npz"
    with pytest.raises(DataError, match="also looked in"):
        open_source("absent.npz")


# --- teachers arrive intact --------------------------------------------------------------------

def _timm_checkpoint(path: Path, args: argparse.Namespace | None, num_classes: int = 3) -> tuple[dict, dict]:
    import timm

    torch.manual_seed(0)
    raw = timm.create_model("resnet10t", num_classes=num_classes).state_dict()
    ema = {k: (v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in raw.items()}
    ck = {"epoch": 9, "arch": "resnet10t", "state_dict": raw, "state_dict_ema": ema}
    if args is not None:
        ck["args"] = args
    torch.save(ck, path)
    return raw, ema


def test_timm_checkpoint_teacher_at_its_own_size_norm_and_stem(tmp_path: Path) -> None:
    import timm

    from medistill.config import DataConfig, TeacherSpec
    from medistill.data import build_data
    from medistill.distill.participants import load_teacher

    npz = write_npz(tmp_path / "d32.npz", size=32)
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    args = argparse.Namespace(model="resnet10t", img_size=32, input_size=None, mean=mean, std=std,
                              interpolation="bicubic", lr=0.1)
    raw, ema = _timm_checkpoint(tmp_path / "model_best.pth.tar", args)
    data = build_data(DataConfig(name=str(npz), augment="none"))
    x = torch.rand(4, 3, 32, 32)
    norm = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    for which, sd in (("raw", raw), ("ema", ema)):
        spec = TeacherSpec(checkpoint=str(tmp_path / "model_best.pth.tar"), model="resnet10t", weights=which)
        t = load_teacher(spec, Path(spec.checkpoint), data)
        ref = timm.create_model("resnet10t", num_classes=3)
        ref.load_state_dict(sd)
        with torch.no_grad():
            assert torch.allclose(t.logits(x), ref.eval()(norm), atol=1e-5), which
        assert t.intake["source"] == "checkpoint args" and t.intake["input_size"] == 32
        assert t.intake["interpolation"] == "bicubic" and t.pre.interpolation == "bicubic"
        assert t.model.conv1[0].stride == (2, 2)          # the stem it was trained with
    # 16-px data: the teacher still sees 32 px (its own size), resized bicubically
    data16 = build_data(DataConfig(name=str(write_npz(tmp_path / "d16.npz")), augment="none"))
    t = load_teacher(TeacherSpec(checkpoint=str(tmp_path / "model_best.pth.tar"), model="resnet10t"),
                     tmp_path / "model_best.pth.tar", data16)
    assert t.pre.input_size == 32


def test_checkpoint_without_args_or_pretrained_cfg_falls_back_and_says_so(tmp_path: Path) -> None:
    import timm

    from medistill.config import DataConfig, TeacherSpec
    from medistill.data import build_data
    from medistill.distill.participants import load_teacher

    sd = timm.create_model("cnn5", num_classes=3, **TINY_CNN).state_dict()
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    data = build_data(DataConfig(name=str(write_npz(tmp_path / "d.npz")), augment="none"))
    with pytest.raises(ModelError, match="teachers.N.model"):     # a mismatch says what to set
        load_teacher(TeacherSpec(checkpoint=str(tmp_path / "w.pth"), model="cnn5"), tmp_path / "w.pth", data)
    torch.save({"state_dict": timm.create_model("cnn5", num_classes=3).state_dict()}, tmp_path / "w.pth")
    t = load_teacher(TeacherSpec(checkpoint=str(tmp_path / "w.pth"), model="cnn5"), tmp_path / "w.pth", data)
    assert "ImageNet" in t.intake["source"] and t.pre.input_size == 16
    with pytest.raises(ModelError, match="state_dict_ema"):
        load_teacher(TeacherSpec(checkpoint=str(tmp_path / "w.pth"), model="cnn5", weights="ema"), tmp_path / "w.pth", data)


def test_external_teacher_intake_recorded_in_run_info(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d32.npz", size=32)
    _timm_checkpoint(tmp_path / "best.pth.tar", argparse.Namespace(img_size=32, mean=None, std=None, interpolation=""))
    cfg = tiny_cfg(npz, tmp_path / "run", epochs=1)
    cfg["teachers"] = [{"name": "teacher", "model": "resnet10t", "checkpoint": str(tmp_path / "best.pth.tar"), "weights": "ema"}]
    cfg["terms"] = [{"type": "ce"}, {"type": "kd", "temperature": 4.0}]
    run_engine(cfg)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())["teachers"]["teacher"]
    assert info["input"]["weights"] == "ema" and info["input"]["source"] == "checkpoint args"
    assert info["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406], abs=1e-6)   # timm's, args left them unset


# --- students leave intact ---------------------------------------------------------------------

def _test_images(run: Path) -> tuple[torch.Tensor, np.ndarray]:
    from medistill.data import build_data
    from medistill.rundir import load_run_config

    cfg = load_run_config(run)
    bundle = build_data(cfg.data, fixed_splits=json.loads((run / "split.json").read_text()))
    bundle.image_size = bundle.source.native_size
    ds = bundle.dataset("test", train=False)
    return torch.stack([ds[i][0] for i in range(len(ds))]), bundle.splits["test"]


def test_exported_student_reproduces_the_runs_predictions(data_dir: Path, tmp_path: Path) -> None:
    import timm
    from safetensors import safe_open

    from medistill.api import load_student
    from medistill.eval.compare import read_predictions

    cfg = tiny_cfg(data_dir / "tiny.npz", tmp_path / "run", epochs=1)
    cfg["students"] = [{"name": "cnn", "model": "cnn5", "kwargs": TINY_CNN},
                       {"name": "res", "model": "resnet10t", "small_input": "off"}]
    run_engine(cfg)
    x, order = _test_images(tmp_path / "run")
    for name in ("cnn", "res"):
        d = tmp_path / "run" / "students" / name
        idx, _, probs = read_predictions(d / "predictions_test.csv")
        model = load_student(d)
        with torch.no_grad():
            mine = torch.softmax(model(x), 1).numpy()
        pos = {int(i): k for k, i in enumerate(order)}
        assert np.allclose(mine[[pos[int(i)] for i in idx]], probs, atol=2e-6), name
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["medistill"])["arch"] == model.config["architecture"]
        assert "## Test results" in (d / "README.md").read_text()
    # the unmodified stem: plain timm builds the same network from config.json
    d = tmp_path / "run" / "students" / "res"
    conf = json.loads((d / "config.json").read_text())
    assert conf["medistill"]["stem"] == "timm"
    plain = timm.create_model(conf["architecture"], pretrained=True, num_classes=conf["num_classes"],
                              pretrained_cfg_overlay={**conf["pretrained_cfg"], "file": str(d / "model.safetensors")})
    pc = conf["pretrained_cfg"]
    xn = (x - torch.tensor(pc["mean"]).view(1, 3, 1, 1)) / torch.tensor(pc["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(xn), load_student(d)(x), atol=1e-5)
    (d / "config.json").unlink()
    with pytest.raises(ModelError, match="config.json is missing"):
        load_student(d)


# --- did it help? ------------------------------------------------------------------------------

def test_paired_bootstrap_against_a_naive_loop() -> None:
    from sklearn.metrics import balanced_accuracy_score

    from medistill.eval.compare import paired_bootstrap
    from medistill.eval.metrics import _resample_weights

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)
    pa, pb = rng.dirichlet(np.ones(3), 60), rng.dirichlet(np.ones(3), 60)
    pa[np.arange(60), y] += 0.4                              # A is better
    res = paired_bootstrap(pa, pb, y, n_resamples=300, seed=5)
    w = _resample_weights(y, 300, 5, stratified=True)
    diffs = []
    for row in w:
        idx = np.repeat(np.arange(60), row.astype(int))
        diffs.append(balanced_accuracy_score(y[idx], pa[idx].argmax(1)) - balanced_accuracy_score(y[idx], pb[idx].argmax(1)))
    m = res["balanced_accuracy"]
    assert m["ci95"] == pytest.approx([np.quantile(diffs, 0.025), np.quantile(diffs, 0.975)], abs=1e-12)
    assert m["diff"] == pytest.approx(balanced_accuracy_score(y, pa.argmax(1)) - balanced_accuracy_score(y, pb.argmax(1)))
    assert m["ci95"][0] > 0 and m["share_a_better"] > 0.975


def test_paired_bootstrap_hand_vector() -> None:
    """Four images, two per class; B misses one image of class 1: balanced accuracy 1.0 vs 0.75."""
    from medistill.eval.compare import paired_bootstrap

    y = np.array([0, 0, 1, 1])
    pa = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.3, 0.7]])
    pb = pa.copy()
    pb[3] = [0.6, 0.4]
    r = paired_bootstrap(pa, pb, y, n_resamples=500, seed=0)["balanced_accuracy"]
    assert (r["a"], r["b"], r["diff"]) == (1.0, 0.75, 0.25)
    # a resample holds image 3 twice (diff 0.5), once (0.25) or never (0): the interval spans those
    assert r["ci95"][0] >= 0.0 and r["ci95"][1] <= 0.5
    assert paired_bootstrap(pa, pa, y, 100)["balanced_accuracy"]["ci95"] == [0.0, 0.0]


def test_baseline_answers_did_it_help(teachers: list[Path], tmp_path: Path) -> None:
    from medistill.report import build_report

    run = _api_distill(teachers[0], tmp_path / "kd", baseline=True)
    alone = run.out / "alone"
    assert json.loads((alone / "summary.json").read_text())["student"]["role"] == "trained alone"
    assert not json.loads((alone / "run_info.json").read_text())["teachers"]
    m = run.comparison["students"]["student"]["metrics"]["balanced_accuracy"]
    kd = json.loads((run.out / "metrics.json").read_text())["test"]["balanced_accuracy"]
    al = json.loads((alone / "metrics.json").read_text())["test"]["balanced_accuracy"]
    assert m["diff"] == pytest.approx(kd - al) and m["ci95"][0] <= m["diff"] <= m["ci95"][1]
    summary = (run.out / "summary.md").read_text()
    assert summary.startswith("**Did distillation help?**") and "paired bootstrap" in summary
    html = build_report([run.out]).read_text()
    assert "Did distillation help?" in html and "recall, alone vs distilled" in html


def test_baseline_with_several_students_and_compare_refusals(teachers: list[Path], data_dir: Path, tmp_path: Path) -> None:
    from medistill.api import distill, train
    from medistill.assemble import execute_run

    ov = [*QUIET, f"students.0.kwargs.widths={TINY_CNN['widths']}"]
    run = distill([teachers[0]], model=["cnn5", "cnn5"], epochs=1, out=tmp_path / "two", quiet=True, baseline=True,
                  overrides=ov + [f"students.1.kwargs.widths={TINY_CNN['widths']}"])
    assert set(run.comparison["students"]) == {"cnn5_0", "cnn5_1"}     # one baseline each
    other = train(data=str(write_npz(tmp_path / "other.npz", seed=9)), model="cnn5", epochs=1, out=tmp_path / "o",
                  overrides=ov, quiet=True)
    with pytest.raises(ConfigError, match="fingerprints"):
        _api_distill(teachers[0], tmp_path / "kd", compare=other.out)
    with pytest.raises(ConfigError, match="not a run directory"):
        execute_run(None, compare=tmp_path / "nothing")       # type: ignore[arg-type]


def test_sweep_with_baseline_puts_the_verdict_first(teachers: list[Path], tmp_path: Path) -> None:
    import yaml

    from medistill.commands.sweep import run_sweep

    base = tiny_cfg(Path(json.loads((teachers[0] / "split.json").read_text())["source"]), tmp_path / "unused", epochs=1)
    base["teachers"] = [{"name": "teacher", "checkpoint": str(teachers[0])}]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    rows = run_sweep(tmp_path / "base.yaml", tmp_path / "sw", methods=["kd"], seeds=[0, 1], overrides=QUIET,
                     baseline=True)
    assert {r["method"] for r in rows} == {"alone", "kd"}
    kd_rows = [r for r in rows if r["method"] == "kd"]
    assert all("vs_alone_bal_acc" in r for r in kd_rows)
    md = (tmp_path / "sw" / "results.md").read_text()
    assert md.startswith("**Did distillation help?**") and "(2 seeds)" in md


# --- resume, finished runs, CLI ---------------------------------------------------------------

def test_resume_refuses_other_flags_and_finished_runs_are_kept(data_dir: Path, tmp_path: Path) -> None:
    from medistill.cli import app

    out = tmp_path / "run"
    r = CliRunner()
    common = ["--data", str(data_dir / "tiny.npz"), "--model", "cnn5", "--out", str(out)] + \
        [a for s in [*QUIET, f"students.0.kwargs.widths={TINY_CNN['widths']}"] for a in ("--set", s)]
    assert r.invoke(app, ["train", *common, "--epochs", "1"]).exit_code == 0
    res = r.invoke(app, ["train", "--out", str(out), "--resume", "--lr", "0.5"])
    assert isinstance(res.exception, ConfigError) and "optim.lr: saved 0.001, given 0.5" in str(res.exception)
    res = r.invoke(app, ["train", "--out", str(out), "--resume", "--data", str(write_npz(tmp_path / "o.npz", seed=4))])
    assert isinstance(res.exception, ConfigError) and "data.name" in str(res.exception)
    before = (out / "metrics.json").read_bytes()
    for f in out.glob("checkpoint_*.pt"):
        f.unlink()
    res = r.invoke(app, ["train", *common, "--epochs", "1"])
    assert isinstance(res.exception, ConfigError) and "not trained over" in str(res.exception)
    assert (out / "metrics.json").read_bytes() == before


def test_version_print_config_and_typos(tmp_path: Path) -> None:
    import yaml

    from medistill.cli import app

    r = CliRunner()
    res = r.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("medistill ")
    res = r.invoke(app, ["train", "--data", "tiny.npz", "--model", "cnn5", "--workers", "2", "--out", str(tmp_path / "x"),
                         "--print-config"])
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["data"]["num_workers"] == 2 and cfg["students"][0]["model"] == "cnn5"
    assert not (tmp_path / "x").exists()
    from medistill.config import load_config

    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(None, ["train.epoch=3"])


def test_student_names_are_the_same_from_cli_and_api(tmp_path: Path) -> None:
    from medistill.assemble import assemble_run

    a = assemble_run("train", None, [("out", str(tmp_path / "a"))], models=["resnet18", "cnn5"])
    b = assemble_run("train", {"out": str(tmp_path / "a")}, [], models=["resnet18", "resnet18"])
    assert [s.name for s in a.students] == ["resnet18", "cnn5"]
    assert [s.name for s in b.students] == ["resnet18_0", "resnet18_1"]


def test_mixed_size_folder_evaluate_equals_the_run(tmp_path: Path) -> None:
    """Images of several sizes and a teacher at a larger input size: evaluate feeds the student
    the same pixels as training did (one data-size rule)."""
    from PIL import Image

    from medistill.commands.evaluate import evaluate_target
    from medistill.eval.compare import read_predictions

    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(14):
            s = (20, 28)[i % 2]
            im = rng.integers(0, 60, (s, s, 3), dtype=np.uint8)
            im[: s // 2, c * s // 3:(c + 1) * s // 3] = 220
            Image.fromarray(im).save(root / f"c{c}" / f"{i}.png")
    t = tiny_cfg(root, tmp_path / "t", epochs=1)
    t["students"] = [{"name": "t", "model": "cnn5", "input_size": 32, "kwargs": TINY_CNN}]
    run_engine(t)
    cfg = tiny_cfg(root, tmp_path / "kd", epochs=1)
    cfg["students"] = [{"name": "student", "model": "cnn5", "input_size": 16, "kwargs": TINY_CNN}]
    cfg["teachers"] = [{"name": "teacher", "checkpoint": str(tmp_path / "t")}]
    cfg["terms"] = [{"type": "ce"}, {"type": "kd"}]
    run_engine(cfg)
    d = tmp_path / "kd" / "students" / "student"
    assert json.loads((d / "model.json").read_text())["data_size"] == 32
    before = read_predictions(d / "predictions_test.csv")[2]
    evaluate_target(tmp_path / "kd", latency=False)
    assert np.allclose(read_predictions(d / "predictions_test.csv")[2], before, atol=1e-6)


def test_api_errors_are_typed(tmp_path: Path) -> None:
    from medistill.api import distill

    with pytest.raises(ConfigError, match="teachers\\[0\\]"):
        distill([42], model="cnn5", out=tmp_path / "x")      # type: ignore[list-item]
    with pytest.raises(ConfigError, match="data must be"):
        distill(["t"], data=["a", "b"], out=tmp_path / "x")  # type: ignore[arg-type]
    assert issubclass(ConfigError, MedistillError)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_gap_closed() -> None:
    from medistill.eval.compare import gap_closed

    assert gap_closed(0.394, 0.341, 0.518) == pytest.approx(0.053 / 0.177)    # the headroom numbers
    assert gap_closed(0.5, 0.4, 0.4) is None and gap_closed(0.3, 0.4, 0.6) == pytest.approx(-0.5)


def test_api_evaluate_predict_explain_export(teachers: list[Path], tmp_path: Path) -> None:
    from PIL import Image

    from medistill import api

    run = tmp_path / "run"
    shutil.copytree(teachers[0], run)
    res = api.evaluate(run)
    assert res["t"]["test"]["n"] > 0
    onnx = api.export(run, out=tmp_path / "m.onnx")
    assert onnx["max_abs_diff"] < 1e-4
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "a.png")
    preds = api.predict(Path(onnx["path"]), [tmp_path / "a.png"])
    assert len(preds) == 1 and abs(sum(preds[0]["probabilities"]) - 1) < 1e-4
    rep = api.explain(run, images=2, methods=["gradcam"], out=tmp_path / "ex", device="cpu")
    assert "t" in rep["models"]


def test_one_resolver_reads_every_kind_of_path(teachers: list[Path], tmp_path: Path) -> None:
    from medistill.rundir import resolve, write_ensemble

    run = teachers[0]
    md = run / "students" / "t"
    assert (resolve(run).kind, resolve(run).run, resolve(run).models) == ("run", run, (md,))
    assert (resolve(md).kind, resolve(md).run) == ("model", run)
    w = resolve(md / "model.safetensors")
    assert (w.kind, w.run, w.models) == ("weights", run, (md,))
    write_ensemble(tmp_path / "ens", teachers)
    e = resolve(tmp_path / "ens")
    assert e.kind == "ensemble" and len(e.models) == 2
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert resolve(tmp_path / "m.onnx").kind == "onnx"
    (tmp_path / "foreign.pth").write_bytes(b"x")
    assert (resolve(tmp_path / "foreign.pth").kind, resolve(tmp_path / "foreign.pth").models) == ("weights", ())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a run, model or ensemble directory"):
        resolve(tmp_path / "empty")
    with pytest.raises(ModelError, match="nothing at"):
        resolve(tmp_path / "absent")
