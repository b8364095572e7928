"""Terms the paper recipes use and engine decisions, each against a hand-computed value or a
naive reference (issue "One home for each concern", safety net)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY_CNN, run_engine, tiny_cfg, write_npz
from medistill.config import OptimConfig, SchedConfig
from medistill.distill.context import StepContext
from medistill.distill.optim import build_optimizer, lr_factor
from medistill.distill.terms import TermSetup, make_term
from medistill.losses import kd_per_sample
from medistill.models import create_model

LN3 = math.log(3.0)


def _setup(counts: list[float]) -> TermSetup:
    return TermSetup(students=["s"], teachers=["t"], num_classes=len(counts), class_counts=torch.tensor(counts),
                     tap_shapes={}, models={})


def _ctx(s: torch.Tensor, t: torch.Tensor, y: list[int], counts: list[float]) -> StepContext:
    c = torch.tensor(counts)
    return StepContext({"s": s, "t": t}, {}, torch.tensor(y), 1.0, c, c / c.sum(), ["t"], ["s"])


def test_hybrid_with_balanced_class_weights_by_hand() -> None:
    """Multi-teacher recipe: α·CE_w + (1 − α)·τ²·KL, counts (3, 1) → weights (2/3, 2)."""
    s = torch.tensor([[LN3, 0.0], [0.0, 0.0]])          # p = (0.75, 0.25) and (0.5, 0.5)
    t = torch.zeros(2, 2)                                # teacher: uniform
    term = make_term("hybrid", "s", {"alpha": 0.5, "temperature": 1.0, "class_weights": "balanced"}, _setup([3, 1]))
    value, parts = term(_ctx(s, t, [0, 1], [3, 1]))
    ce = (2 / 3 * -math.log(0.75) + 2 * math.log(2)) / (2 / 3 + 2)      # weighted mean, PyTorch's convention
    kl0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kd = kl0 / 2
    assert parts["ce"] == pytest.approx(ce, abs=1e-6) and parts["kd"] == pytest.approx(kd, abs=1e-6)
    assert float(value) == pytest.approx(0.5 * ce + 0.5 * kd, abs=1e-6)          # 0.331851


def test_focal_and_logit_adjusted_terms_by_hand() -> None:
    s = torch.tensor([[0.0, LN3]])                        # p_t = 0.75 for class 1
    focal = make_term("focal", "s", {"gamma": 2.0}, _setup([1, 1]))
    assert float(focal(_ctx(s, s, [1], [1, 1]))) == pytest.approx(0.25 ** 2 * -math.log(0.75), abs=1e-6)
    la = make_term("logit_adjusted", "s", {}, _setup([3, 1]))
    # z + log π = (log 0.75, log 0.25): CE for class 1 = −log 0.25 = log 4
    assert float(la(_ctx(torch.zeros(1, 2), torch.zeros(1, 2), [1], [3, 1]))) == pytest.approx(math.log(4), abs=1e-6)


def test_kd_per_sample_against_a_naive_loop() -> None:
    torch.manual_seed(0)
    z, zt, tau = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), 3.0
    q = torch.softmax(zt / tau, -1)
    got = kd_per_sample(z, q, tau)
    for b in range(5):
        logp = [zz / tau - math.log(sum(math.exp(v / tau) for v in z[b].tolist())) for zz in z[b].tolist()]
        ref = tau ** 2 * sum(qi * (math.log(qi) - lp) for qi, lp in zip(q[b].tolist(), logp))
        assert float(got[b]) == pytest.approx(ref, rel=1e-9)


def test_lr_schedule_factors() -> None:
    cos = SchedConfig(name="cosine", warmup_epochs=1.0)
    f = [lr_factor(k, cos, 1e-3, epochs=3, steps_per_epoch=10) for k in range(31)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)          # linear warm-up over 10 steps
    assert f[10] == pytest.approx(1.0) and f[20] == pytest.approx(0.5) and f[30] == pytest.approx(0.0, abs=1e-12)
    floor = SchedConfig(name="cosine", min_lr=1e-4)
    assert lr_factor(30, floor, 1e-3, 3, 10) == pytest.approx(0.1)           # ends at min_lr / lr
    step = SchedConfig(name="step", step_size=1, gamma=0.1)
    assert [lr_factor(k, step, 1e-3, 3, 10) for k in (0, 9, 10, 25)] == pytest.approx([1, 1, 0.1, 0.01])
    assert lr_factor(7, SchedConfig(name="constant"), 1e-3, 3, 10) == 1.0


def test_head_and_module_learning_rates_and_no_decay_on_biases_and_norms() -> None:
    m = create_model("cnn5", 3, 3, 16, **TINY_CNN)
    extra = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))]
    opt = build_optimizer(m, extra, OptimConfig(lr=1e-3, head_lr=1e-2, module_lr=5e-4, weight_decay=0.05))
    # body, head and module parameters, each split into decayed (≥ 2-D) and not decayed (biases, norms)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        (1e-3, 0.05), (1e-3, 0.0), (1e-2, 0.05), (1e-2, 0.0), (5e-4, 0.05), (5e-4, 0.0)]
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    head = {id(p) for p in m.get_classifier().parameters()}
    assert ids[2] | ids[3] == head and not head & (ids[0] | ids[1])
    norms = {id(p) for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d) for p in mod.parameters()}
    assert norms and norms <= ids[1]
    assert all(p.ndim > 1 for g in opt.param_groups if g["weight_decay"] for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters())) + 2


def test_early_stopping_and_term_warmup(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    cfg = tiny_cfg(npz, tmp_path / "r", epochs=6, early_stopping_patience=1)
    cfg["optim"] = {"name": "sgd", "lr": 1e-12}          # nothing can improve after the first epoch
    run_engine(cfg)
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2                                 # epoch 1 sets the best, epoch 2 fails → stop
    # A term's weight ramps as min(epoch / warmup_epochs, 1): logged values are the raw terms, the
    # total is their ramped sum; with CE alone ramped over 4 epochs the first epoch's loss is ~1/8 of CE.
    cfg = tiny_cfg(npz, tmp_path / "w", epochs=1)
    cfg["terms"] = [{"type": "ce", "warmup_epochs": 4.0}]
    run_engine(cfg)
    rec = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[0])["train"]["student"]
    assert 0.0 < rec["loss"] < 0.3 * rec["ce"]


def test_grad_clip_bounds_the_update(tmp_path: Path) -> None:
    """With SGD (no momentum) and clip c, one step moves the weights by at most lr·c."""
    npz = write_npz(tmp_path / "d.npz")
    cfg = tiny_cfg(npz, tmp_path / "c", epochs=1, grad_clip=1e-3, batch_size=200)
    cfg["optim"] = {"name": "sgd", "lr": 1.0, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    cfg["sched"] = {"name": "constant"}
    from medistill.config import load_config
    from medistill.distill.engine import Engine

    eng = Engine(load_config(None, [], base=cfg))
    eng.setup()
    start = [p.detach().clone() for p in eng.students[0].model.parameters()]
    eng.fit()
    moved = torch.cat([(a.detach() - b).flatten() for a, b in zip(eng.students[0].model.parameters(), start)])
    assert 0.0 < float(moved.norm()) <= 1e-3 * 1.0001
