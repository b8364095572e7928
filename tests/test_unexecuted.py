"""Behaviours no test executed before: the fp16 overflow path of the update, EMA weights being
what is validated and saved, every train.loss variant, the KD aggregation options against naive
references, and FitNet's regressor between maps of different sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import run_engine, tiny_cfg
from medistill.config import OptimConfig, SchedConfig, TrainConfig
from medistill.distill.context import StepContext
from medistill.distill.optim import Updater
from medistill.distill.terms import TermSetup, make_term


def _setup(students=("s",), teachers=("t0", "t1"), k=3, shapes=None) -> TermSetup:
    return TermSetup(students=list(students), teachers=list(teachers), num_classes=k, class_counts=torch.tensor([5.0, 3.0, 2.0]),
                     tap_shapes=shapes or {}, models={},
                     facts={("teacher_val_recall",): torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]])})


def test_fp16_overflow_skips_the_step_and_the_schedule_waits() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    student = SimpleNamespace(name="s", model=lin)
    up = Updater([student], {}, OptimConfig(name="sgd", lr=0.1, weight_decay=0.0), SchedConfig(name="cosine"),
                 TrainConfig(epochs=2), steps_per_epoch=3, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    before = [p.detach().clone() for p in lin.parameters()]
    lr0 = up.optims["s"].param_groups[0]["lr"]
    x = torch.randn(5, 4)
    bad = lin(x).sum() * float("inf")                       # gradients are inf: an overflow
    assert up.step(["s"], bad, 0) is False
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))
    assert up.scheds["s"].last_epoch == 0 and up.optims["s"].param_groups[0]["lr"] == lr0
    assert up.scaler.get_scale() == 2.0 ** 7                # halved
    assert up.step(["s"], lin(x).sum(), 0) is True          # a good step moves both
    assert not all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))
    assert up.scheds["s"].last_epoch == 1


def test_ema_weights_are_validated_and_saved(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medistill.config import load_config
    from medistill.distill import evaluation
    from medistill.distill.engine import Engine

    saved_models: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
    original = evaluation.save_model_dir

    def recording(d, model, spec, *a, **k):
        saved_models.append((model, {n: v.detach().clone() for n, v in model.state_dict().items()}))
        return original(d, model, spec, *a, **k)

    monkeypatch.setattr(evaluation, "save_model_dir", recording)
    cfg = tiny_cfg(data_dir / "tiny.npz", tmp_path / "e", epochs=2, ema={"enabled": True, "decay": 0.5})
    eng = Engine(load_config(None, [], base=cfg))
    eng.run()
    ema = eng.updater.emas["student"].module
    assert saved_models and all(m is ema for m, _ in saved_models)          # the EMA copy is what is saved
    on_disk = load_file(str(tmp_path / "e" / "students" / "student" / "model.safetensors"))
    last = saved_models[-1][1]
    assert all(torch.equal(on_disk[k], last[k].cpu()) for k in on_disk)
    raw = eng.students[0].model.state_dict()
    k = next(n for n, v in raw.items() if v.is_floating_point() and v.numel() > 4)
    assert not torch.equal(ema.state_dict()[k], raw[k])                      # and it differs from the raw weights


@pytest.mark.parametrize("loss,term", [("ce", "ce"), ("focal", "focal"), ("cb_ce", "ce"), ("cb_focal", "focal"),
                                       ("logit_adjusted", "logit_adjusted")])
def test_every_train_loss_variant_trains(data_dir: Path, tmp_path: Path, loss: str, term: str) -> None:
    from medistill.config import load_config
    from medistill.distill.methods import supervised_terms

    cfg = tiny_cfg(data_dir / "tiny.npz", tmp_path / loss, epochs=1, loss=loss)
    spec = supervised_terms(load_config(None, [], base=cfg))[0]
    assert spec.type == term
    if loss.startswith("cb_"):
        assert spec.params()["class_weights"] == "class_balanced"
    run_engine(cfg)
    rec = json.loads((tmp_path / loss / "metrics.jsonl").read_text().splitlines()[0])["train"]["student"]
    assert math.isfinite(rec[term]) and rec[term] > 0


def _ctx(zs: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, y: torch.Tensor) -> StepContext:
    return StepContext(logits={"s": zs, "t0": t0, "t1": t1}, feats={}, target=y, epoch=1.0,
                       class_counts=torch.ones(3), class_prior=torch.ones(3) / 3, teachers=["t0", "t1"], students=["s"])


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def _softmax(z: list[float], tau: float = 1.0) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def test_kd_aggregation_options_against_naive_loops() -> None:
    torch.manual_seed(1)
    zs, t0, t1 = torch.randn(4, 3), torch.randn(4, 3) * 2, torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    tau = 2.0

    def naive(weights_per_sample, gate=None, normalise=False, sample_w=None):
        tot, wsum = 0.0, 0.0
        for b in range(4):
            w0, w1 = weights_per_sample(b)
            q = [w0 * a + w1 * c for a, c in zip(_softmax(t0[b].tolist(), tau), _softmax(t1[b].tolist(), tau))]
            per = tau ** 2 * _kl(q, _softmax(zs[b].tolist(), tau))
            w = 1.0 if sample_w is None else sample_w(q)
            if gate is not None:
                w *= float(max(range(3), key=lambda c: q[c]) == int(y[b]))
            tot += w * per
            wsum += w
        return tot / (wsum if normalise else 4)

    ctx = _ctx(zs, t0, t1, y)
    # static teacher weights, normalised to sum to one
    term = make_term("kd", "s", {"temperature": tau, "aggregate": "prob_mean", "teacher_weights": [3.0, 1.0]}, _setup())
    assert float(term(ctx)[0]) == pytest.approx(naive(lambda b: (0.75, 0.25)), rel=1e-5)
    # entropy: per-sample weights softmax_m(−H_m/κ) of each teacher's normalised entropy
    def ent_w(b: int, kappa: float = 0.5):
        h = [-sum(p * math.log(p) for p in _softmax(t[b].tolist())) / math.log(3) for t in (t0, t1)]
        e = [math.exp(-v / kappa) for v in h]
        return e[0] / sum(e), e[1] / sum(e)
    term = make_term("kd", "s", {"temperature": tau, "aggregate": "entropy", "entropy_kappa": 0.5}, _setup())
    assert float(term(ctx)[0]) == pytest.approx(naive(ent_w), rel=1e-5)
    # gate_correct + normalize_weights: only samples the aggregated teacher gets right, mean over them
    term = make_term("kd", "s", {"temperature": tau, "aggregate": "prob_mean", "gate_correct": True,
                                 "normalize_weights": True}, _setup())
    assert float(term(ctx)[0]) == pytest.approx(naive(lambda b: (0.5, 0.5), gate=True, normalise=True), rel=1e-5)
    # recall: per-class weights from each teacher's validation recall, indexed by the label
    rec = [[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]]
    term = make_term("kd", "s", {"temperature": tau, "aggregate": "recall"}, _setup())
    want = naive(lambda b: (rec[0][int(y[b])] / (rec[0][int(y[b])] + rec[1][int(y[b])]),
                            rec[1][int(y[b])] / (rec[0][int(y[b])] + rec[1][int(y[b])])))
    assert float(term(ctx)[0]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("s_hw,t_hw", [((8, 8), (4, 4)), ((4, 4), (8, 8)), ((6, 6), (4, 4))])
def test_fitnet_regressor_bridges_maps_of_different_sizes(s_hw, t_hw) -> None:
    shapes = {"s": {"a": (1, 5, *s_hw)}, "t0": {"b": (1, 7, *t_hw)}}
    term = make_term("fitnet", "s", {"student_tap": "a", "teacher_tap": "b", "teacher": "t0"},
                     _setup(teachers=("t0",), shapes=shapes)).eval()
    fs, ft = torch.randn(2, 5, *s_hw), torch.randn(2, 7, *t_hw)
    ctx = StepContext(logits={}, feats={"s": {"a": fs}, "t0": {"b": ft}}, target=torch.zeros(2, dtype=torch.long),
                      epoch=0.0, class_counts=torch.ones(3), class_prior=torch.ones(3) / 3, teachers=["t0"], students=["s"])
    out = term.regressor(fs)
    assert out.shape == ft.shape
    naive = sum(float((a - b) ** 2) for a, b in zip(out.flatten().tolist(), ft.flatten().tolist())) / ft.numel()
    assert float(term(ctx)) == pytest.approx(naive, rel=1e-5)
    loss = term(ctx)
    loss.backward()
    assert all(p.grad is not None for p in term.regressor.parameters() if p.requires_grad)


def test_fp16_loss_scale_survives_a_checkpoint(tmp_path: Path) -> None:
    """Resuming an fp16 run restores the loss scale (restarting at 2**16 would overflow again)."""
    from rich.console import Console

    from medistill.distill import checkpoint as ckpt

    def updater() -> tuple[Updater, nn.Module]:
        torch.manual_seed(0)
        lin = nn.Linear(4, 3)
        up = Updater([SimpleNamespace(name="s", model=lin)], {}, OptimConfig(name="sgd", lr=0.1, weight_decay=0.0),
                     SchedConfig(name="cosine"), TrainConfig(epochs=2), steps_per_epoch=3,
                     scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
        return up, lin

    up, lin = updater()
    x = torch.randn(5, 4)
    up.step(["s"], lin(x).sum() * float("inf"), 0)            # overflow: 2**10 → 2**9
    up.step(["s"], lin(x).sum(), 0)
    ckpt.save_checkpoint(tmp_path, 0, {"s": 0.5}, 0, {"students": {"s": lin}, **up.state_groups()}, nn.ModuleDict())
    fresh, lin2 = updater()
    assert fresh.scaler.get_scale() == 2.0 ** 10
    start, best, _ = ckpt.load_checkpoint(tmp_path, {"students": {"s": lin2}, **fresh.state_groups()}, nn.ModuleDict(),
                                          Console(quiet=True), trim_log=False)
    assert start == 1 and best == {"s": 0.5}
    assert fresh.scaler.get_scale() == up.scaler.get_scale() == 2.0 ** 9
    assert fresh.scheds["s"].last_epoch == up.scheds["s"].last_epoch == 1
    assert all(torch.equal(a, b) for a, b in zip(lin.parameters(), lin2.parameters()))


def test_terms_declare_whole_split_facts_and_never_call_back() -> None:
    """KD's recall weighting and ND's class means are computed once by whoever builds the terms
    (the engine), from what the terms declare in ``needs()``; each fact once, however many
    terms ask for it."""
    from medistill.config import TermSpec
    from medistill.distill.methods import build_terms
    from medistill.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher_val_recall"):
        make_term("kd", "s", {"aggregate": "recall"}, TermSetup(students=["s"], teachers=["t0"], num_classes=3,
                                                                 class_counts=torch.ones(3), tap_shapes={}, models={}))
    asked: list[tuple[str, ...]] = []

    def provide(need: tuple[str, ...]) -> torch.Tensor:
        asked.append(need)
        return torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]])

    class P:    # a participant as build_terms sees one
        def __init__(self, name: str) -> None:
            self.name, self.taps, self.model = name, set(), nn.Identity()

    setup = _setup(students=("a", "b"))
    setup.facts = {}
    parts = {n: P(n) for n in ("a", "b", "t0", "t1")}
    terms, _ = build_terms([TermSpec(type="kd", aggregate="recall"), TermSpec(type="ce")], setup, parts,
                           probe=lambda n, t: {}, provide=provide)
    assert asked == [("teacher_val_recall",)]             # two KD terms, one computation
    assert torch.equal(terms["a__kd"].recall, torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]]))
    assert not hasattr(setup, "teacher_val_recall") and not hasattr(setup, "teacher_class_means")


def test_kd_logit_adjust_against_a_naive_loop_and_a_hand_value() -> None:
    """KD with the student's logits shifted by a·log(prior) inside the KL."""
    import dataclasses

    torch.manual_seed(2)
    zs, t0, t1 = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    prior = torch.tensor([0.6, 0.3, 0.1])
    ctx = dataclasses.replace(_ctx(zs, t0, t1, y), class_prior=prior)
    tau, a = 2.0, 1.0
    got, _ = make_term("kd", "s", {"temperature": tau, "teachers": ["t0"], "logit_adjust": a}, _setup())(ctx)
    want = sum(tau ** 2 * _kl(_softmax(t0[b].tolist(), tau),
                              _softmax([z + a * math.log(p) for z, p in zip(zs[b].tolist(), prior.tolist())], tau))
               for b in range(4)) / 4
    assert float(got) == pytest.approx(want, rel=1e-5)
    plain, _ = make_term("kd", "s", {"temperature": tau, "teachers": ["t0"]}, _setup())(ctx)
    assert float(plain) != pytest.approx(want, rel=1e-3)
    # hand value: one sample, τ = 1, teacher uniform over 2 classes, student logits 0, prior (0.8, 0.2):
    # p_S = softmax(log 0.8, log 0.2) = (0.8, 0.2); KL((.5, .5) ‖ (.8, .2)) = .5 ln(.5/.8) + .5 ln(.5/.2)
    one = StepContext(logits={"s": torch.zeros(1, 2), "t0": torch.zeros(1, 2)}, feats={}, target=torch.tensor([0]),
                      epoch=0.0, class_counts=torch.tensor([8.0, 2.0]), class_prior=torch.tensor([0.8, 0.2]),
                      teachers=["t0"], students=["s"])
    v, _ = make_term("kd", "s", {"temperature": 1.0, "logit_adjust": 1.0},
                     _setup(teachers=("t0",), k=2))(one)
    assert float(v) == pytest.approx(0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2), rel=1e-6)


def test_kd_balanced_preset_and_its_fair_baseline(tmp_path) -> None:
    """``--method kd_balanced`` expands to LA CE + logit-adjusted KD, and its ``--baseline`` trains
    the student alone with logit-adjusted CE — the method's own supervised loss."""
    from medistill.assemble import assemble_run, baseline_config

    cfg = assemble_run("distill", None, [("data.name", "x.npz"), ("out", str(tmp_path / "o"))], models=["cnn5"],
                       teachers=[str(tmp_path / "t")], method="kd_balanced")
    assert [t.type for t in cfg.terms] == ["logit_adjusted", "kd"]
    assert cfg.terms[1].params()["logit_adjust"] == 1.0 and cfg.train.loss == "logit_adjusted"
    assert baseline_config(cfg).train.loss == "logit_adjusted" and not baseline_config(cfg).terms
