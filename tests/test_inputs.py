"""No silent choices (issue 44): what each model is fed, said and followed; degenerate models
named; explanations that show progress; students that plain timm rebuilds or that say they
need medistill; the self-training control."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_images, run_cli, write_npz

SMALL = "students.0.kwargs={widths: [8, 8, 16, 16, 16]}"


def _flat(p) -> str:
    """What a command printed, without whitespace: rich folds long lines (and paths) anywhere."""
    return "".join((p.stdout + p.stderr).replace("│", "").split())


def _has(p, words: str) -> bool:
    return "".join(words.split()) in _flat(p)


def _csv_of_24px(root: Path) -> Path:
    x, y = make_images([12, 12, 12], 24, 3, seed=5)
    root.mkdir()
    rows = ["path,label"]
    for i, (im, c) in enumerate(zip(x, y)):
        Image.fromarray(im).save(root / f"{i}.png")
        rows.append(f"{i}.png,c{c}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root / "data.csv"


def test_own_csv_student_follows_a_16px_teacher_alone_arm_too(tmp_path: Path) -> None:
    csv = _csv_of_24px(tmp_path / "own")
    teacher = tmp_path / "teacher"
    r = run_cli("train", "--data", str(csv), "--model", "cnn5", "--epochs", "1", "--input-size", "16",
                "--out", str(teacher), "--set", SMALL)
    assert r.returncode == 0, _flat(r)[-600:]
    pool = tmp_path / "pool"
    pool.mkdir()
    for i, im in enumerate(make_images([3, 3], 24, 3, seed=77)[0]):
        Image.fromarray(im).save(pool / f"u{i}.png")
    out = tmp_path / "kd"
    r = run_cli("distill", "--teacher", str(teacher), "--method", "kd", "--model", "cnn5", "--epochs", "1",
                "--unlabeled", str(pool), "--out", str(out), "--baseline", "--set", SMALL)
    assert r.returncode == 0, _flat(r)[-600:]
    assert _has(r, "input of teacher 'teacher': 16 px") and _has(r, "as trained (its model.json)")
    assert _has(r, "input of student 'student': 16 px") and _has(r, "size: its teacher's (teacher 16 px)")
    for run in (out, out / "alone"):    # the alone arm is the same 16-px student, not one at the images' 24 px
        assert json.loads((run / "students" / "student" / "model.json").read_text())["input_size"] == 16
    info = json.loads((out / "run_info.json").read_text())["description"]
    assert any("unlabelled images: 6 from" in d for d in info)
    md = (out / "summary.md").read_text()
    assert "## This run" in md and "0.1·ce + 0.9·kd(temperature=4.0)" in md
    card = (out / "students" / "student" / "README.md").read_text()
    assert "Unlabelled images: 6 from" in card and "cnn5 at 16 px" in card
    # --input-size still wins, and says so
    r = run_cli("distill", "--teacher", str(teacher), "--method", "kd", "--model", "cnn5", "--epochs", "1",
                "--input-size", "24", "--out", str(tmp_path / "kd24"), "--set", SMALL, "--print-config")
    assert r.returncode == 0


def _plain_balanced_accuracy(weights: Path, npz: Path, mean: list[float], std: list[float], size: int) -> float:
    """The teacher scored without medistill's pipeline: timm's model, the safetensors weights,
    the test images resized (bilinear, antialiased) and normalised by hand."""
    import timm
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from sklearn.metrics import balanced_accuracy_score

    model = timm.create_model("cnn5", num_classes=3).eval()
    model.load_state_dict(load_file(str(weights)))
    with np.load(npz) as z:
        x = torch.as_tensor(z["test_images"]).permute(0, 3, 1, 2).float() / 255
        y = z["test_labels"].reshape(-1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    return float(balanced_accuracy_score(y, pred))


def test_bare_weights_with_config_json_are_fed_as_trained(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    teacher = tmp_path / "teacher"
    r = run_cli("train", "--data", str(npz), "--model", "cnn5", "--epochs", "3", "--out", str(teacher),
                "--set", "students.0.norm=imagenet", "--set", "data.augment=none")
    assert r.returncode == 0, _flat(r)[-600:]
    src = teacher / "students" / "student"
    byo = tmp_path / "byo"
    byo.mkdir()
    shutil.copy(src / "model.safetensors", byo / "model.safetensors")
    shutil.copy(src / "config.json", byo / "config.json")
    cfg = json.loads((byo / "config.json").read_text())["pretrained_cfg"]
    out = tmp_path / "kd"
    r = run_cli("distill", "--teacher", f"cnn5={byo / 'model.safetensors'}", "--data", str(npz), "--method", "kd",
                "--model", "cnn5", "--epochs", "1", "--out", str(out), "--set", SMALL,
                "--set", f"teachers.0.small_input={json.loads((byo / 'config.json').read_text())['medistill']['small_input']}")
    assert r.returncode == 0, _flat(r)[-600:]
    assert _has(r, "config.json beside the weights") and not _has(r, "nothing beside its weights")
    got = json.loads((out / "summary.json").read_text())["teacher"]["test"]["balanced_accuracy"]
    plain = _plain_balanced_accuracy(byo / "model.safetensors", npz, cfg["mean"], cfg["std"], cfg["input_size"][1])
    assert got == pytest.approx(plain, abs=1e-9)
    # without the config.json the fallback is said, with the settings that would fix it
    (byo / "config.json").unlink()
    r = run_cli("distill", "--teacher", f"cnn5={byo / 'model.safetensors'}", "--data", str(npz), "--method", "kd",
                "--model", "cnn5", "--epochs", "1", "--out", str(tmp_path / "kd2"), "--set", SMALL)
    assert r.returncode == 0, _flat(r)[-600:]
    assert _has(r, "warning: teacher 'teacher': nothing beside its weights says how it was trained")
    assert _has(r, "--set teachers.0.input_size=32 --set teachers.0.norm=half")


def test_degenerate_models_are_named_at_the_epoch_in_the_summary_and_the_verdict() -> None:
    from medistill.config import EvalConfig
    from medistill.distill.evaluation import degenerate_warnings
    from medistill.eval.compare import verdict_line
    from medistill.eval.tables import summary_table

    ev, watch = EvalConfig(chance_epochs=2), {}
    one = {"s": {"predicted_classes": 1, "balanced_accuracy": 1 / 3}}
    said = [degenerate_warnings(one, 3, ev, watch) for _ in range(3)]
    assert said[0] == ["s predicts 1 of 3 classes on validation (degenerate: its balanced accuracy cannot rise far "
                       "above chance, 0.333)"]
    assert said[1] == ["s has been at chance on validation (balanced accuracy 0.333) for 2 epochs in a row: check the "
                       "learning rate and loss weights, or train longer"]
    assert said[2] == []                                   # said once per streak, not every epoch
    assert degenerate_warnings({"s": {"predicted_classes": 3, "balanced_accuracy": 0.6}}, 3, ev, watch) == []
    assert len(degenerate_warnings(one, 3, ev, watch)) == 1   # degenerate again: said again
    # summary.md: a model whose test predictions cover one class (its confusion matrix's columns)
    row = {"role": "trained alone", "model": {"params": 1e6, "flops": 1e6},
           "test": {"balanced_accuracy": 1 / 3, "accuracy": 0.5, "confusion_matrix": [[5, 0, 0], [3, 0, 0], [2, 0, 0]]}}
    assert "**Warning:** student predicts 1 of 3 classes on these test images: degenerate" in summary_table({"student": row})
    # the verdict: "helped" against a one-class alone arm is qualified
    m = {"a": 0.45, "b": 1 / 3, "diff": 0.117, "ci95": [0.05, 0.183]}
    rec = {"metrics": {"balanced_accuracy": m}, "n_images": 60, "num_classes": 3,
           "predicted_classes": {"distilled": 3, "alone": 1}}
    line = verdict_line("student", rec)
    assert "distillation helped — but only against a degenerate baseline: the student alone predicts 1 of 3 classes" in line
    both = verdict_line("student", {**rec, "predicted_classes": {"distilled": 1, "alone": 1},
                                    "metrics": {"balanced_accuracy": {**m, "diff": 0.0, "ci95": [0.0, 0.0]}}})
    assert "both arms are degenerate (1 and 1 of 3 classes predicted): no verdict can be read" in both
    assert "degenerate" not in verdict_line("student", {**rec, "predicted_classes": {"distilled": 3, "alone": 2}})


def test_explain_says_progress_and_an_all_channel_score_cam_first(data_dir: Path, teachers: list[Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from medistill.explain import run as explain_module

    monkeypatch.setattr(explain_module, "AUTO_TOP_K", 4)               # the tiny cnn5's 16 channels count as many
    monkeypatch.setattr(explain_module, "AUTO_TOP_K_AGREEMENT", 1.01)  # and top-k never agrees: the fallback
    r = run_cli("explain", str(teachers[0]), "--images", "2", "--methods", "gradcam,scorecam", "--out",
                str(teachers[0].parent / "ex"))
    assert r.returncode == 0, _flat(r)[-600:]
    text = _flat(r)
    note = text.index("".join("note: t: Score-CAM on all 16 channels".split()))
    assert note < text.index("".join("explain 2 images: 2/2".split()))     # announced before it runs
    assert _has(r, "explain 2 images: 1/2 t gradcam") and _has(r, "s left")


def _rebuilt_by_plain_timm(d: Path, x: torch.Tensor) -> torch.Tensor:
    import timm
    from safetensors.torch import load_file

    cfg = json.loads((d / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg["model_args"]).eval()
    model.load_state_dict(load_file(str(d / "model.safetensors")))   # strict
    pc = cfg["pretrained_cfg"]
    x = torch.nn.functional.interpolate(x, size=pc["input_size"][1:], mode="bilinear", antialias=True)
    x = (x - torch.tensor(pc["mean"]).view(1, -1, 1, 1)) / torch.tensor(pc["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        return model(x).softmax(1)


@pytest.mark.parametrize("arch,size", [("resnet18", 72), ("resnet18", 32), ("cnn5", 32)])
def test_every_exported_student_is_rebuilt_by_plain_timm_or_says_it_needs_medistill(arch: str, size: int,
                                                                                   tmp_path: Path) -> None:
    from medistill.api import load_student
    from medistill.models import create_model, save_model_dir
    from medistill.models.factory import ModelSpecRecord
    from medistill.models.timm_config import write_config

    torch.manual_seed(0)
    model = create_model(arch, 3, 3, size).eval()
    spec = ModelSpecRecord(arch=arch, num_classes=3, in_chans=3, data_chans=3, input_size=size, small_input="auto",
                           mean=[0.5] * 3, std=[0.5] * 3, class_names=["a", "b", "c"],
                           adaptation=getattr(model, "medistill_adaptation", None), data_size=size)
    for m in model.modules():   # non-trivial BatchNorm statistics, so that a wrong stem shows in the outputs
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    d = tmp_path / "student"
    save_model_dir(d, model, spec)
    write_config(d, spec)
    x = torch.rand(2, 3, size, size)
    ours = load_student(d)(x).softmax(1).detach()
    cfg = json.loads((d / "config.json").read_text())
    card_note = ""
    if "load_with" not in cfg:
        assert torch.allclose(_rebuilt_by_plain_timm(d, x), ours, atol=1e-6)
        return
    assert cfg["load_with"] == "medistill.api.load_student" and "load_student" in cfg["why"]
    card_note = cfg["why"]
    if arch == "resnet18":   # the adapted stem: plain timm refuses the weights, or loads them and computes other outputs
        try:
            assert (_rebuilt_by_plain_timm(d, x) - ours).abs().max() > 1e-3
        except RuntimeError as e:
            assert "size mismatch" in str(e)
    assert "adapted stem" in card_note if arch == "resnet18" else "medistill's own" in card_note


def test_baseline_selftrain_runs_and_reports_the_control(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    for i, im in enumerate(make_images([3, 3, 3], 16, 3, seed=61)[0]):
        Image.fromarray(im).save(pool / f"u{i}.png")
    out = tmp_path / "kd"
    r = run_cli("distill", "--teacher", str(teachers[0]), "--method", "kd", "--model", "cnn5", "--epochs", "1",
                "--unlabeled", str(pool), "--out", str(out), "--baseline", "selftrain", "--set", SMALL)
    assert r.returncode == 0, _flat(r)[-600:]
    self_cfg = json.loads(json.dumps(__import__("yaml").safe_load((out / "selftrain" / "config.yaml").read_text())))
    assert [t["name"] for t in self_cfg["teachers"]] == ["self"]
    assert self_cfg["terms"] == __import__("yaml").safe_load((out / "config.yaml").read_text())["terms"]
    assert self_cfg["data"]["unlabeled"]      # the same pool
    md = (out / "summary.md").read_text()
    assert md.startswith("**Did distillation help?**")
    assert "**Is it the teacher's knowledge?** Against the self-training control" in md
    rec = json.loads((out / "comparison_selftrain.json").read_text())
    assert rec["control"] == "selftrain" and rec["alone_run"] == "selftrain"
    r = run_cli("distill", "--teacher", str(teachers[0]), "--method", "kd", "--model", "cnn5", "--out",
                str(tmp_path / "x"), "--baseline", "teacher")
    assert r.returncode == 2 and _has(r, "--baseline 'teacher': use --baseline (the student alone) or --baseline selftrain")


def test_a_csv_path_under_two_labels_is_a_label_conflict_naming_every_such_path(tmp_path: Path) -> None:
    from medistill.config import DataConfig
    from medistill.data import build_data
    from medistill.errors import DataError

    csv = _csv_of_24px(tmp_path / "own")
    text = csv.read_text() + "0.png,c2\n3.png,c1\n5.png,c0\n"
    csv.write_text(text)
    with pytest.raises(DataError, match=r"label conflicts — 2 image\(s\) listed under two labels: 0.png \(line 2: 'c0', "
                                        r"line 38: 'c2'\); 3.png \(line 5: 'c0', line 39: 'c1'\)"):
        build_data(DataConfig(name=str(csv)))


def test_the_demo_verdict_over_seeds() -> None:
    from medistill.commands.demo import seed_verdict

    def m(d: float, lo: float, hi: float) -> dict:
        return {"diff": d, "ci95": [lo, hi]}

    assert seed_verdict([m(0.1, 0.05, 0.15), m(0.08, 0.02, 0.14), m(0.02, -0.03, 0.07)])["word"] == "helped"
    one_coin = seed_verdict([m(0.11, 0.06, 0.17), m(0.0, -0.05, 0.05), m(-0.01, -0.06, 0.04)])
    assert one_coin["word"].startswith("made no difference") and one_coin["above"] == 1
    assert seed_verdict([m(0.1, 0.05, 0.15), m(0.1, 0.05, 0.15), m(-0.1, -0.15, -0.05)])["word"].startswith("made no")
    assert seed_verdict([m(-0.1, -0.15, -0.05), m(-0.1, -0.15, -0.05), m(0.0, -0.05, 0.05)])["word"] == "hurt"
    assert "+0.067 ± 0.042 (3 seeds)" in seed_verdict([m(0.1, 0.05, 0.15), m(0.08, 0.02, 0.14),
                                                      m(0.02, -0.03, 0.07)])["text"]
