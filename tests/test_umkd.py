"""UMKD terms: shapes for heterogeneous experts and several input sizes, gradient isolation."""

from __future__ import annotations

import pytest
import torch

from medistill.distill.context import StepContext
from medistill.distill.terms import TermSetup, make_term
from medistill.distill.terms.umkd import CFL, LearnableLowPass
from medistill.errors import ModelError
from medistill.models import FeatureTaps, create_model


def _setup(models: dict, taps: dict, x: torch.Tensor, teachers: list[str]) -> tuple[TermSetup, dict, dict]:
    logits, feats, shapes = {}, {}, {}
    for name, m in models.items():
        with FeatureTaps(m, sorted(taps[name]), detach=name in teachers) as t, torch.set_grad_enabled(name not in teachers):
            logits[name] = m(x)
        feats[name] = dict(t.outputs)
        shapes[name] = {k: (1, *v.shape[1:]) for k, v in t.outputs.items()}
    setup = TermSetup(students=["s"], teachers=teachers, num_classes=5, class_counts=torch.ones(5), tap_shapes=shapes,
                      models=models)
    return setup, logits, feats


def test_module_shapes() -> None:
    assert LearnableLowPass(64)(torch.randn(2, 64, 56, 56)).shape == (2, 64, 56, 56)
    hs, hts, rs = CFL(64, [256, 256], 128)(torch.randn(2, 64, 14, 14), [torch.randn(2, 256, 14, 14)] * 2)
    assert hs.shape == (2, 128, 14, 14) and rs[0].shape == (2, 256, 14, 14) and len(hts) == 2
    hs, _, rs = CFL(512, [2048, 2048], 128)(torch.randn(2, 512, 7, 7), [torch.randn(2, 2048, 7, 7)] * 2)
    assert hs.shape == (2, 128, 7, 7) and rs[1].shape == (2, 2048, 7, 7)


@pytest.mark.parametrize("size", [28, 64])
def test_heterogeneous_experts_and_gradients(size: int) -> None:
    torch.manual_seed(0)
    s = create_model("resnet18", 5, 3, size)
    e1 = create_model("resnet34", 5, 3, size).eval()
    e2 = create_model("densenet121", 5, 3, size).eval()
    for e in (e1, e2):
        e.requires_grad_(False)
    models = {"s": s, "e1": e1, "e2": e2}
    x = torch.randn(2, 3, size, size)
    sfa_taps = {"e1": "layer1", "e2": "features.denseblock1"}
    cfa_taps = {"e1": "layer4", "e2": "features.norm5"}
    taps = {"s": {"layer1", "layer4"}, "e1": {"layer1", "layer4"}, "e2": {sfa_taps["e2"], cfa_taps["e2"]}}
    setup, logits, feats = _setup(models, taps, x, ["e1", "e2"])
    terms = {
        "sfa": make_term("sfa", "s", {"expert_tap": sfa_taps}, setup),
        "cfa": make_term("cfa", "s", {"expert_tap": cfa_taps}, setup),
        "udd": make_term("udd", "s", {"expert_tap": cfa_taps, "scales": [1, 2]}, setup),
    }
    ctx = StepContext(logits, feats, torch.tensor([0, 3]), 0.0, torch.ones(5), torch.full((5,), 0.2), ["e1", "e2"], ["s"])
    total = 0
    for name, t in terms.items():
        v, diag = t(ctx)
        assert torch.isfinite(v) and v.dim() == 0, name
        total = total + v
    total.backward()
    assert all(p.grad is None for e in (e1, e2) for p in e.parameters())
    for key in ("sfa", "cfa"):
        cfl = terms[key].cfl
        assert all(p.grad is not None for p in cfl.align_t.parameters())   # expert-side branches train
        assert all(p.grad is not None for p in cfl.dec.parameters())
    assert s.get_classifier().weight.grad is not None and s.layer1[0].conv1.weight.grad is not None


def test_udd_region_scale_too_large() -> None:
    s = create_model("resnet18", 5, 3, 28, small_input="off").eval()
    e = create_model("resnet18", 5, 3, 28, small_input="off").eval()
    setup, logits, feats = _setup({"s": s, "e": e}, {"s": {"layer4"}, "e": {"layer4"}}, torch.randn(2, 3, 28, 28), ["e"])
    with pytest.raises(ModelError, match="smaller than the finest region scale"):
        make_term("udd", "s", {}, setup)


def test_preact_taps_differ_from_post_relu() -> None:
    m = create_model("resnet18", 5, 3, 28).eval()
    from medistill.models.taps import preact_tap

    for mod in m.modules():  # timm zero-initialises each block's last BN; undo it so the sum can be negative
        if isinstance(mod, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(mod.weight)
    name = preact_tap(m, "layer4")
    assert name == "layer4.1.act2:in"
    with FeatureTaps(m, [name, "layer4"]) as t, torch.no_grad():
        m(torch.randn(2, 3, 28, 28))
    assert float(t[name].min()) < 0 and float(t["layer4"].min()) >= 0
    assert torch.allclose(t[name].relu(), t["layer4"])


def test_pointwise_equals_a_1x1_convolution() -> None:
    """The CFL's 1×1 convolutions run as a GEMM (faster on small maps); same values and gradients."""
    from medistill.distill.terms.umkd import Pointwise

    torch.manual_seed(0)
    pw = Pointwise(16, 8)
    conv = torch.nn.Conv2d(16, 8, 1, bias=False)
    conv.weight.data.copy_(pw.weight.data)
    x1 = torch.randn(3, 16, 5, 7, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    a, b = pw(x1), conv(x2)
    assert a.shape == b.shape == (3, 8, 5, 7)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (a * torch.arange(a.numel()).view_as(a).sin()).sum().backward()
    (b * torch.arange(b.numel()).view_as(b).sin()).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pw.weight.grad, conv.weight.grad, rtol=1e-4, atol=1e-5)
    assert set(pw.state_dict()) == set(conv.state_dict()) == {"weight"}   # checkpoints load either way


def _sfa_case(size: int, pool: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The SFA term's value at ``pool`` and a naive reference written from the spec: LLF on the
    student map, msLF on the experts', both average-pooled by the expected factor, then the CFL
    block, Σ_e MMD² + Σ_e MSE."""
    import torch.nn.functional as F

    from medistill.losses import functional as L

    torch.manual_seed(1)
    feats = {"s": {"layer1": torch.randn(4, 8, size, size)},
             "e1": {"layer1": torch.randn(4, 12, size, size).relu()}, "e2": {"layer1": torch.randn(4, 16, size, size)}}
    shapes = {k: {"layer1": (1, *v["layer1"].shape[1:])} for k, v in feats.items()}
    setup = TermSetup(students=["s"], teachers=["e1", "e2"], num_classes=3, class_counts=torch.ones(3), tap_shapes=shapes,
                      models={})
    term = make_term("sfa", "s", {"hidden": 8, "pool": pool}, setup)
    ctx = StepContext({}, feats, torch.tensor([0, 1, 2, 0]), 0.0, torch.ones(3), torch.full((3,), 1 / 3), ["e1", "e2"], ["s"])
    got, _ = term(ctx)
    k = (size // 6 if pool == "auto" else pool) or 1
    pool_k = (lambda f: F.avg_pool2d(f, k, ceil_mode=True)) if k > 1 else (lambda f: f)
    fs = pool_k(term.llf(feats["s"]["layer1"]))
    fts = [pool_k(L.multiscale_lowpass(feats[e]["layer1"])) for e in ("e1", "e2")]
    hs = term.cfl.ext(term.cfl.align_s(fs))
    want = 0
    for i, ft in enumerate(fts):
        ht = term.cfl.ext(term.cfl.align_t[i](ft))
        want = want + L.mmd2(hs, ht) + F.mse_loss(term.cfl.dec[i](ht), ft)
    return got, want


@pytest.mark.parametrize(("size", "pool"), [(28, "auto"), (28, 1), (28, 2), (11, "auto"), (13, 3)])
def test_sfa_pooling_against_a_naive_reference(size: int, pool: object) -> None:
    got, want = _sfa_case(size, pool)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sfa_auto_pool_leaves_small_maps_as_the_official_code() -> None:
    """Maps under 12 px are not pooled by ``auto``: the value is the full-resolution one."""
    a, _ = _sfa_case(11, "auto")
    b, _ = _sfa_case(11, 1)
    assert torch.equal(a, b)
    c, _ = _sfa_case(28, "auto")
    d, _ = _sfa_case(28, 1)
    assert not torch.allclose(c, d)       # and 28 px maps are pooled (to 7 px)
