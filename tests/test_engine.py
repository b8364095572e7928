"""The engine end to end on tiny generated data: run directory, evaluation, resume, multi-teacher
× multi-student distillation, gradient isolation, the teacher cache and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_CNN, tiny_cfg, write_npz
from medistill.config import load_config
from medistill.distill import cache as cache_mod
from medistill.distill.engine import Engine
from medistill.errors import CacheMismatchError, ConfigError, ModelError, NonFiniteLossError
from medistill.commands.evaluate import evaluate_target
from medistill.io import torch_load


def run(cfg: dict, resume: bool = False) -> Engine:
    eng = Engine(load_config(None, [], base=cfg), resume=resume)
    eng.run()
    return eng


def test_train_writes_run_directory(tiny_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(tiny_cfg(tiny_npz, out, epochs=8))
    for f in ("config.yaml", "run_info.json", "split.json", "metrics.jsonl", "checkpoint_last.pt", "metrics.json", "summary.md"):
        assert (out / f).is_file(), f
    assert list((out / "tb").glob("events.*"))
    sd = out / "students" / "student"
    for f in ("model.json", "model.safetensors", "metrics.json", "predictions_test.csv", "confusion_test.png"):
        assert (sd / f).is_file(), f
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == list(range(8))
    m = json.loads((out / "metrics.json").read_text())
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "auroc", "ece", "nll", "per_class_recall", "confusion_matrix"):
        assert k in m["test"] and k in m["val"]
    assert m["model"]["params"] > 0 and m["model"]["flops"] > 0
    rows = (sd / "predictions_test.csv").read_text().splitlines()
    assert rows[0] == "index,label,pred,prob_0,prob_1,prob_2"
    assert len(rows) - 1 == sum(sum(r) for r in m["test"]["confusion_matrix"])
    assert abs(sum(float(v) for v in rows[1].split(",")[3:]) - 1) < 1e-4
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 0 and info["versions"]["torch"]
    # a learnable toy task is actually learnt
    assert m["test"]["balanced_accuracy"] > 0.5


def test_evaluate_reproduces_metrics(tiny_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(tiny_cfg(tiny_npz, out, epochs=1))
    res = evaluate_target(out, out=tmp_path / "ev", latency=False)
    saved = json.loads((out / "metrics.json").read_text())
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["test"] == saved["test"] and again["val"] == saved["val"] and again["model"] == saved["model"]
    assert set(res) == {"student"}


def test_refuses_to_overwrite_and_unwritable(tiny_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(tiny_cfg(tiny_npz, out, epochs=1))
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        run(tiny_cfg(tiny_npz, out, epochs=1))
    assert (out / "metrics.json").read_bytes() == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        run(tiny_cfg(tiny_npz, tmp_path / "file" / "run"))


def test_resume_equals_uninterrupted(tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = tmp_path / "full"
    run(tiny_cfg(tiny_npz, full, epochs=3, ema={"enabled": True, "decay": 0.9}))
    cut = tmp_path / "cut"
    original = Engine._step

    def crash(self: Engine, batch, epoch: int, step: int):
        if epoch == 2 and step == 1:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch, epoch, step)

    monkeypatch.setattr(Engine, "_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(tiny_npz, cut, epochs=3, ema={"enabled": True, "decay": 0.9}))
    monkeypatch.setattr(Engine, "_step", original)
    assert torch_load(cut / "checkpoint_last.pt")["epoch"] == 1
    changed = tiny_cfg(tiny_npz, cut, epochs=2, ema={"enabled": True, "decay": 0.9})
    changed["optim"]["lr"] = 0.01
    with pytest.raises(ConfigError, match=r"optim\.lr: saved 0\.003, given 0\.01; train\.epochs: saved 3, given 2"):
        run(changed, resume=True)       # every difference listed; fewer epochs is a difference too
    run(tiny_cfg(tiny_npz, cut, epochs=3, ema={"enabled": True, "decay": 0.9}), resume=True)
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((cut / "metrics.json").read_text())
    assert a["test"] == b["test"] and a["val"] == b["val"]
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 3
    # more epochs is the one change allowed: the run goes on from its last epoch to the new total
    run(tiny_cfg(tiny_npz, cut, epochs=4, ema={"enabled": True, "decay": 0.9}), resume=True)
    assert [json.loads(x)["epoch"] for x in (cut / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_nan_loss_stops_with_checkpoint_intact(tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medistill.distill.terms import CETerm

    out = tmp_path / "run"
    orig = CETerm.forward

    def nan_later(self, ctx):
        v = orig(self, ctx)
        return v * float("nan") if ctx.epoch > 1.0 else v

    monkeypatch.setattr(CETerm, "forward", nan_later)
    with pytest.raises(NonFiniteLossError, match="intact"):
        run(tiny_cfg(tiny_npz, out, epochs=3))
    st = torch_load(out / "checkpoint_last.pt")
    assert st["epoch"] == 0
    assert (out / "students" / "student" / "model.safetensors").is_file()


def _distill_cfg(data_dir: Path, teachers: list[Path], out: Path, terms: list[dict], augment: str = "none",
                 students: int = 2, **train: object) -> dict:
    cfg = tiny_cfg(data_dir / "tiny.npz", out, **train)
    cfg["data"]["augment"] = augment
    cfg["teachers"] = [{"name": f"t{i}", "checkpoint": str(t)} for i, t in enumerate(teachers)]
    cfg["students"] = [{"name": f"s{i}", "model": "cnn5", "kwargs": TINY_CNN} for i in range(students)]
    cfg["terms"] = terms
    return cfg


def test_two_teachers_two_students(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    terms = [{"type": "ce", "weight": 0.5},
             {"type": "kd", "weight": 0.5, "aggregate": "recall", "sample_weight": "entropy"},
             {"type": "peer", "weight": 0.2, "temperature": 4.0},
             {"type": "fitnet", "weight": 1.0, "student_tap": "conv3", "teacher_tap": "conv3", "teacher": "t1"}]
    eng = Engine(load_config(None, [], base=_distill_cfg(data_dir, teachers, tmp_path / "run", terms)))
    eng.setup()
    t_state = {t.name: {k: v.clone() for k, v in t.model.state_dict().items()} for t in eng.teachers}
    eng.fit()
    eng.finalize()
    for t in eng.teachers:
        assert not t.model.training
        assert all(p.grad is None and not p.requires_grad for p in t.model.parameters())
        assert all(torch.equal(v, t_state[t.name][k]) for k, v in t.model.state_dict().items())  # incl. BN stats
    # regressors are trained by the student's optimizer
    reg = [p for k, term in eng.terms.items() if "fitnet" in k for p in term.parameters()]
    opt_params = {id(p) for g in eng.updater.optims["s0"].param_groups for p in g["params"]}
    assert reg and any(id(p) in opt_params for p in reg)
    # hooks never outlive a step
    for p in eng.parts.values():
        assert all(len(m._forward_hooks) == 0 for m in p.model.modules())
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"ce", "kd", "peer", "fitnet", "loss", "kd.confidence_weight"} <= set(rec["train"]["s1"])
    assert len(rec["diagnostics"]["s0.kd"]["confidence_weight"]["per_class"]) == 3
    for s in ("s0", "s1"):
        assert (tmp_path / "run" / "students" / s / "metrics.json").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary) == {"t0", "t1", "s0", "s1"}
    res = evaluate_target(tmp_path / "run" / "students" / "s1", out=tmp_path / "ev", latency=False)
    assert res["s1"]["test"] == json.loads((tmp_path / "run" / "students" / "s1" / "metrics.json").read_text())["test"]


def test_sequential_dml_without_teacher(data_dir: Path, tmp_path: Path) -> None:
    cfg = _distill_cfg(data_dir, [], tmp_path / "run", [{"type": "ce"}, {"type": "peer"}], update="sequential", epochs=1)
    run(cfg)
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["train"]["s0"]["peer"] > 0 and rec["train"]["s1"]["peer"] > 0


def test_teacher_cache_hit_miss_mismatch(data_dir: Path, teachers: list[Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    terms = [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9}, {"type": "nd", "teacher": "t0"}]
    run(_distill_cfg(data_dir, teachers[:1], tmp_path / "a", terms, augment="dihedral", students=1, epochs=1, teacher_amp="off"))
    files = sorted((tmp_path / "teacher_cache").glob("*.safetensors"))
    assert len(files) == 1
    man = json.loads(files[0].with_suffix(".json").read_text())
    assert man["views"] == list(range(8)) and "global_pool" in man["outputs"]

    # hit: the teacher never runs during training
    calls = {"n": 0}
    orig = Engine._teacher_outputs

    def counting(self, x, idx, view):
        calls["n"] += sum(t.name not in self.cache for t in self.teachers)
        return orig(self, x, idx, view)

    monkeypatch.setattr(Engine, "_teacher_outputs", counting)
    eng = run(_distill_cfg(data_dir, teachers[:1], tmp_path / "b", terms, augment="dihedral", students=1, epochs=1, teacher_amp="off"))
    assert "t0" in eng.cache and calls["n"] == 0
    # cached outputs equal live teacher outputs on a batch
    x, y, idx, view = next(iter(eng.data.loader("train", 8, train=True)))
    live = eng.teachers[0].logits(x)
    assert torch.allclose(eng.cache["t0"].lookup(torch.as_tensor(idx), torch.as_tensor(view))["logits"], live, atol=1e-5)

    # miss: another teacher checkpoint → a second cache file
    run(_distill_cfg(data_dir, teachers[1:], tmp_path / "c", terms, augment="dihedral", students=1, epochs=1, teacher_amp="off"))
    assert len(list((tmp_path / "teacher_cache").glob("*.safetensors"))) == 2

    # mismatch: a cache presented for another configuration is refused
    other = dict(man, teacher_sha256="0" * 64)
    with pytest.raises(CacheMismatchError, match="teacher_sha256"):
        cache_mod.TeacherCache.load(files[0], other)

    # batch mixing: the cache is refused when forced, skipped under auto
    with pytest.raises(ConfigError, match=r"mixing augmentation \(train.mix=mixup\)"):
        run(_distill_cfg(data_dir, teachers[:1], tmp_path / "d", terms[:2], students=1, epochs=1,
                         teacher_cache="on", mix="mixup"))


def test_standard_augmentation_caches_fixed_crops(data_dir: Path, teachers: list[Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Under data.augment=standard the student draws from train.teacher_views fixed crops per
    image and the teacher's outputs on them are cached: the teacher never runs during training,
    and every cached row equals the live teacher on that very crop."""
    terms = [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9}]
    calls = {"n": 0}
    orig = Engine._teacher_outputs

    def counting(self, x, idx, view):
        calls["n"] += sum(t.name not in self.cache for t in self.teachers)
        if self.cache:   # every training view is one of the cached crops
            assert bool((torch.as_tensor(view) >= 8).all() and (torch.as_tensor(view) < 11).all())
        return orig(self, x, idx, view)

    monkeypatch.setattr(Engine, "_teacher_outputs", counting)
    eng = run(_distill_cfg(data_dir, teachers[:1], tmp_path / "a", terms, augment="standard", students=1, epochs=1,
                           teacher_views=3, teacher_amp="off"))
    assert "t0" in eng.cache and calls["n"] == 0
    assert eng.cache["t0"].manifest["views"] == [8, 9, 10] and eng.cache["t0"].manifest["view_seed"] == 0
    x, _y, idx, view = next(iter(eng.data.loader("train", 16, train=True, seed=3)))
    assert len(set(torch.as_tensor(view).tolist())) > 1          # the student draws among the crops
    with torch.no_grad():
        live = eng.teachers[0].logits(x)
    assert torch.allclose(eng.cache["t0"].lookup(torch.as_tensor(idx), torch.as_tensor(view))["logits"], live, atol=1e-5)
    # the same image in the same view is the same crop in every epoch
    ds = eng.data.dataset("train", train=True)
    a = ds.augment
    img = torch.rand(3, 16, 16)
    seen = {}
    for _ in range(40):
        out, v = a(img, 5)
        assert v not in seen or torch.equal(seen[v], out)
        seen[v] = out
    assert sorted(seen) == [8, 9, 10] and not torch.equal(seen[8], seen[9])
    # a cache off: fresh crops (view −1) and the teacher runs live
    eng2 = run(_distill_cfg(data_dir, teachers[:1], tmp_path / "b", terms, augment="standard", students=1, epochs=1,
                            teacher_cache="off"))
    assert eng2.cache == {} and calls["n"] > 0
    assert set(torch.as_tensor(next(iter(eng2.data.loader("train", 8, train=True)))[3]).tolist()) == {-1}


def test_bad_distillation_inputs(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown tap 'nope'"):
        run(_distill_cfg(data_dir, teachers, tmp_path / "a", [{"type": "fitnet", "student_tap": "nope", "teacher_tap": "conv3"}]))
    with pytest.raises(ConfigError, match="unknown loss term 'kdd'"):
        run(_distill_cfg(data_dir, teachers, tmp_path / "b", [{"type": "kdd"}]))
    with pytest.raises(ConfigError, match="temprature: unknown key"):
        run(_distill_cfg(data_dir, teachers, tmp_path / "c", [{"type": "kd", "temprature": 3}]))
    four = write_npz(tmp_path / "four.npz", counts=(10, 10, 10, 10))
    cfg = _distill_cfg(data_dir, teachers, tmp_path / "d", [{"type": "kd"}])
    cfg["data"]["name"] = str(four)
    with pytest.raises(ModelError, match="3 classes but the data has 4"):
        run(cfg)
    with pytest.raises(ModelError, match="not found"):
        run(_distill_cfg(data_dir, [tmp_path / "missing"], tmp_path / "e", [{"type": "kd"}]))


def test_umkd_in_the_engine(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    terms = [{"type": "ce"},
             {"type": "sfa", "weight": 10.0, "student_tap": "conv2", "expert_tap": "conv2"},
             {"type": "cfa", "weight": 10.0, "student_tap": "conv4", "expert_tap": "conv4"},
             {"type": "udd", "student_tap": "conv5", "expert_tap": "conv5", "scales": [1]}]  # conv5 is 1×1 at 16 px
    eng = run(_distill_cfg(data_dir, teachers, tmp_path / "run", terms, students=1, epochs=1))
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["train"]["s0"]
    assert {"sfa", "sfa.mmd", "sfa.recon", "cfa", "udd", "udd.confidence"} <= set(rec)
    opt = {id(p) for g in eng.updater.optims["s0"].param_groups for p in g["params"]}
    mods = [p for k, t in eng.terms.items() for p in t.parameters()]
    assert mods and all(id(p) in opt for p in mods)
    # tapped feature maps are cached with the logits while they fit the memory budget
    assert set(eng.cache["t0"].outputs) == {"logits", "conv2", "conv4", "conv5"}
    over = _distill_cfg(data_dir, teachers, tmp_path / "over", terms, students=1, epochs=1, teacher_cache="on",
                        teacher_cache_max_mb=0.01)
    with pytest.raises(ConfigError, match="teacher_cache_max_mb"):
        run(over)
    with pytest.raises(ModelError, match="feeds the classifier"):
        run(_distill_cfg(data_dir, teachers, tmp_path / "bad", [{"type": "udd", "student_tap": "conv4", "expert_tap": "conv4",
                                                                  "scales": [1]}], students=1, epochs=1))


def test_dual_student_preset_equals_functional_api(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    from medistill.distill.context import StepContext
    from medistill.distill.methods import method_terms
    from medistill.losses import dual_student_losses

    cfg = _distill_cfg(data_dir, teachers[:1], tmp_path / "run", method_terms("dual_student", 1), students=2, epochs=1)
    eng = Engine(load_config(None, [], base=cfg))
    eng.setup()
    g = torch.Generator().manual_seed(0)
    z1, z2, zt = (torch.randn(6, 3, generator=g) for _ in range(3))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ctx = StepContext({"t0": zt, "s0": z1, "s1": z2}, {}, y, 1.0, eng.class_counts, eng.class_prior, ["t0"], ["s0", "s1"])
    l1, _ = eng._objective(ctx, "s0")
    l2, _ = eng._objective(ctx, "s1")
    r1, r2 = dual_student_losses(z1, z2, zt, y)
    assert torch.allclose(l1, r1, atol=1e-6) and torch.allclose(l2, r2, atol=1e-6)


def test_sweep_collects_one_table(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    import yaml

    from medistill.commands.sweep import run_sweep

    base = _distill_cfg(data_dir, teachers[:1], tmp_path / "unused", [], students=1, epochs=1)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    rows = run_sweep(tmp_path / "base.yaml", tmp_path / "sw", methods=["kd", "dkd"], grid=["optim.lr=0.001,0.003"], seeds=[0, 1])
    assert len(rows) == 8
    md = (tmp_path / "sw" / "results.md").read_text()
    assert len([ln for ln in md.splitlines() if ln.startswith("|")]) == 2 + 4 and "± " in md
    assert "mean ± std over seeds" in md
    again = run_sweep(tmp_path / "base.yaml", tmp_path / "sw", methods=["kd", "dkd"], grid=["optim.lr=0.001,0.003"], seeds=[0, 1])
    assert again == rows  # finished runs are reused, not retrained


def test_swa_weights_are_what_is_saved(tiny_npz: Path, tmp_path: Path) -> None:
    from medistill.models.factory import load_model_dir

    eng = run(tiny_cfg(tiny_npz, tmp_path / "run", epochs=4, swa={"enabled": True, "start_epoch": 2, "lr": 1e-3}))
    saved, _, _ = load_model_dir(tmp_path / "run" / "students" / "student")
    avg = eng.updater.swas["student"]
    assert int(avg.n_averaged) == 2
    for (k, a), b in zip(saved.state_dict().items(), avg.module.state_dict().values()):
        assert torch.equal(a, b), k
    last = eng.students[0].model.state_dict()
    assert any(not torch.equal(saved.state_dict()[k], v) for k, v in last.items() if v.dtype.is_floating_point)


def test_kd_without_t2_scale(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    from medistill.distill.context import StepContext

    cfg = _distill_cfg(data_dir, teachers[:1], tmp_path / "run",
                       [{"type": "kd", "temperature": 5.0}, {"type": "kd", "temperature": 5.0, "t2_scale": False}], students=1)
    eng = Engine(load_config(None, [], base=cfg))
    eng.setup()
    z, t = torch.randn(4, 3), torch.randn(4, 3)
    ctx = StepContext({"t0": t, "s0": z}, {}, torch.tensor([0, 1, 2, 0]), 1.0, eng.class_counts, eng.class_prior, ["t0"], ["s0"])
    _, logs = eng._objective(ctx, "s0")
    assert abs(logs["kd"] / 25.0 - logs["kd2"]) < 1e-6


def test_dho_dual_head_student(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    from medistill.distill.methods import method_terms
    from medistill.models.factory import load_model_dir

    cfg = _distill_cfg(data_dir, teachers[:1], tmp_path / "run", method_terms("dho", 2), students=1, epochs=2)
    cfg["students"] = [{"name": "s0", "model": "resnet18", "input_size": 16, "kwargs": {"dual_head": True}}]
    run(cfg)
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["train"]["s0"]
    assert {"ce", "kd"} <= set(rec)
    model, pre, spec = load_model_dir(tmp_path / "run" / "students" / "s0")
    from medistill.models.dualhead import A_GRID, B_GRID

    assert min(abs(float(model.a) - a) for a in A_GRID) < 1e-6 and min(abs(float(model.b) - b) for b in B_GRID) < 1e-6
    heads = json.loads((tmp_path / "run" / "students" / "s0" / "metrics.json").read_text())["dho_heads"]
    assert heads == {"a": float(model.a), "b": float(model.b)}
    x = torch.rand(3, 3, 16, 16)
    z_ce, z_kd = model.heads(pre(x))
    p = model.a * torch.softmax(z_ce, -1) + (1 - model.a) * torch.softmax(z_kd / model.b, -1)
    assert torch.allclose(torch.softmax(model(pre(x)), -1), p, atol=1e-5)


def test_dho_combination_limits() -> None:
    from medistill.models import create_model

    m = create_model("resnet18", 3, 3, 16, dual_head=True).eval()
    x = torch.rand(2, 3, 16, 16)
    z_ce, z_kd = m.heads(x)
    m.a.fill_(1.0)
    assert torch.equal(m(x).argmax(1), z_ce.argmax(1))
    m.a.fill_(0.0)
    m.b.fill_(1.0)
    assert torch.equal(m(x).argmax(1), z_kd.argmax(1))
    # in between, the model's output is log of DHO's combination (E.3), computed by hand here
    m.a.fill_(0.3)
    m.b.fill_(2.0)
    want = torch.log(0.3 * torch.softmax(z_ce, -1) + 0.7 * torch.softmax(z_kd / 2.0, -1))
    assert torch.allclose(m(x), want, atol=1e-6)


def test_resume_from_a_checkpoint_that_does_not_fit_is_a_clear_error(tiny_npz: Path, tmp_path: Path) -> None:
    """An optimizer state with another parameter-group layout (e.g. saved by an older version)
    is refused naming the state, not a torch traceback."""
    from medistill.io import torch_load, torch_save

    cfg = tiny_cfg(tiny_npz, tmp_path / "r", epochs=1)
    run(cfg)
    ck = tmp_path / "r" / "checkpoint_last.pt"
    st = torch_load(ck)
    st["optim"]["student"]["param_groups"] = st["optim"]["student"]["param_groups"][:1]
    torch_save(ck, st)
    with pytest.raises(ConfigError, match="optim state of 'student' does not fit"):
        run(cfg, resume=True)
