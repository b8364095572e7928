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
                      models=models, teacher_val_recall=lambda: torch.ones(len(teachers), 5),
                      teacher_class_means=lambda t, tap: torch.zeros(5, 8))
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
