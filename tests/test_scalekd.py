"""ScaleKD against the test vectors of shared/docs/scalekd.md §5, naive references, gradient flow
and a tiny end-to-end run. Inputs are drawn in float32 and cast to float64, as the spec says."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medistill import losses as L
from medistill.distill.terms.scalekd import (
    CrossAttentionProjector,
    StageSpec,
    TeacherLastStage,
    scalekd_losses,
    student_stage_taps,
    teacher_stage_spec,
    tokens_to_map,
)
from medistill.errors import ModelError

D = torch.float64


def close(a: torch.Tensor | float, b: list[float] | float, rel: float = 1e-5) -> None:
    a = torch.as_tensor(a, dtype=D)
    b = torch.as_tensor(b, dtype=D)
    assert torch.allclose(a, b, rtol=rel, atol=1e-5 * max(1.0, float(b.abs().max()))), (a, b)


# --- TV1: DCT and DC removal --------------------------------------------------------------------

def test_tv1_dct_matrix_and_dc_removal():
    d4 = L.dct_matrix(4)
    close(d4[0], [2, 2, 2, 2])
    close(d4[1], [1.84776, 0.765367, -0.765367, -1.84776])
    x = torch.arange(16, dtype=D).reshape(1, 1, 4, 4)
    X = L.dct2(x)[0, 0]
    expected = {(0, 0): 480.0, (0, 1): -50.4692, (0, 3): -3.58673, (1, 0): -201.877, (3, 0): -14.3469}
    for (i, j), v in expected.items():
        close(X[i, j], v)
    mask = torch.ones(4, 4, dtype=torch.bool)
    for ij in expected:
        mask[ij] = False
    assert X[mask].abs().max() < 1e-9
    Xz = L.dct2(x).clone()
    Xz[..., 0, 0] = 0
    assert torch.allclose(L.idct2(Xz), x - 7.5, atol=1e-12)
    assert torch.allclose(L.dct_remove_dc(x), x - 7.5, atol=1e-12)


def test_tv1_random_map():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 4).to(D)
    X = L.dct2(x)
    close(X[0, 0, 0, :], [-7.63646, 7.68316, -7.74253, 9.18410])
    close(X[0, 1, 0, 0], 8.48024)
    r = L.dct_remove_dc(x)
    close(r[0, 0, 0, :], [-1.00652, -1.03304, -0.131259, -0.314559])
    assert (r - (x - x.mean((-2, -1), keepdim=True))).abs().max() < 1e-12
    for n in (1, 2, 3, 5, 7, 14):
        assert torch.allclose(torch.linalg.inv(L.dct_matrix(n)) @ L.dct_matrix(n), torch.eye(n, dtype=D), atol=2e-14)


@pytest.mark.parametrize("hw", [(3, 5), (7, 2), (1, 4)])
def test_dc_removal_non_square_equals_dct_route(hw):
    """The official DCT fails for H ≠ W; the mean form must equal zeroing the DC coefficient."""
    x = torch.randn(2, 3, *hw, dtype=D)
    X = L.dct2(x).clone()
    X[..., 0, 0] = 0
    assert torch.allclose(L.dct_remove_dc(x), L.idct2(X), atol=1e-10)


# --- TV2: DFM losses ----------------------------------------------------------------------------

def naive_dfm(s: torch.Tensor, t: torch.Tensor, view: str) -> float:
    """Loops over batch and positions: Σ over channels of (s/‖s‖ − t/‖t‖)², summed, over B."""
    if view == "frequency":
        s = s - s.mean((-2, -1), keepdim=True)
        t = t - t.mean((-2, -1), keepdim=True)
    total = 0.0
    b, c, h, w = s.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                a, e = s[i, :, y, x], t[i, :, y, x]
                a = a / max(float(a.norm()), 1e-12)
                e = e / max(float(e.norm()), 1e-12)
                total += float(((a - e) ** 2).sum())
    return total / b


def test_tv2_dfm_losses():
    torch.manual_seed(0)
    s = torch.randn(2, 16, 8).to(D)
    t = torch.randn(2, 8, 4, 4).to(D)
    sm = tokens_to_map(s, (4, 4))
    close(L.dfm_loss(sm, t, "spatial"), 32.8902)
    close(0.08 * L.dfm_loss(sm, t, "spatial"), 2.63121)
    close(L.dfm_loss(sm, t, "frequency"), 33.6742)
    close(0.06 * L.dfm_loss(sm, t, "frequency"), 2.02045)
    for view in ("spatial", "frequency"):
        assert float(L.dfm_loss(t, t, view)) == pytest.approx(0.0, abs=1e-12)
        assert float(L.dfm_loss(sm, t, view)) == pytest.approx(naive_dfm(sm, t, view), rel=1e-10)
    torch.manual_seed(0)
    s = torch.randn(2, 49, 16).to(D)
    t = torch.randn(2, 16, 7, 7).to(D)
    close(L.dfm_loss(tokens_to_map(s, (7, 7)), t), 101.143)
    close(L.dfm_loss(tokens_to_map(s, (7, 7)), t, view="frequency"), 100.679)


def test_dfm_refuses_bad_input():
    with pytest.raises(ValueError, match="differ"):
        L.dfm_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="view"):
        L.dfm_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), view="dct")


# --- TV3: logit terms ---------------------------------------------------------------------------

def test_tv3_logit_terms():
    torch.manual_seed(0)
    zs = torch.randn(4, 10)
    zt = (2 * torch.randn(4, 10))
    zs, zt = zs.to(D), zt.to(D)
    y = torch.tensor([1, 3, 5, 7])
    ce = F.cross_entropy(zs, y)
    close(ce, 2.85605)
    close(0.5 * ce, 1.42802)
    close(0.5 * L.soft_target_ce(zs, zt, 1.0), 1.33994)
    close(0.5 * L.kd_loss(zs, zt, 1.0), 0.665627)
    close(0.5 * L.soft_target_ce(zs, zt, 4.0), 18.6656)
    close(F.cross_entropy(zs, y, label_smoothing=0.1), 2.84000)
    close(0.5 * ce + 0.5 * L.soft_target_ce(zs, zt), 2.76796)
    # naive reference: −τ² mean_b Σ p_T log p_S with explicit softmax
    pt = torch.exp(zt / 4) / torch.exp(zt / 4).sum(-1, keepdim=True)
    ps = torch.exp(zs / 4) / torch.exp(zs / 4).sum(-1, keepdim=True)
    close(L.soft_target_ce(zs, zt, 4.0), float(-16 * (pt * ps.log()).sum(-1).mean()))


def test_soft_target_ce_no_nan_on_underflow():
    zs = torch.tensor([[0.0, -1e4, 5.0]], requires_grad=True)
    zt = torch.tensor([[0.0, 1e4, -1e4]])
    v = L.soft_target_ce(zs, zt)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(zs.grad).all()
    assert float(v.detach()) == pytest.approx(1e4 + float(torch.logsumexp(zs.detach()[0], 0)), rel=1e-4)


# --- TV4: one projector -------------------------------------------------------------------------

SPEC_ORDER = ["proj_student.0.weight", "proj_student.0.bias", "pos_embed", "query.weight", "proj_pos.0.weight",
              "proj_pos.0.bias", "q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "proj.weight",
              "proj.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def fill(module: nn.Module, gen: torch.Generator) -> None:
    """Fill the parameters in the spec's order (BN and LN stay at 1/0)."""
    params = dict(module.named_parameters())
    assert set(params) - set(SPEC_ORDER) == {"proj_student.1.weight", "proj_student.1.bias", "norm.weight", "norm.bias"}
    with torch.no_grad():
        for name in SPEC_ORDER:
            if name in params:
                params[name].copy_(torch.randn(params[name].shape, generator=gen) * 0.3)


def tv4_projector() -> CrossAttentionProjector:
    p = CrossAttentionProjector(4, 6, (2, 2), (2, 2), heads=2, softmax_scale=5.0, self_query=True)
    fill(p, torch.Generator().manual_seed(1))
    return p.to(D).train()


def test_tv4_projector_self_query_and_external_query():
    p = tv4_projector()
    torch.manual_seed(0)
    x, qx, t = torch.randn(2, 4, 2, 2).to(D), torch.randn(2, 4, 6).to(D), torch.randn(2, 6, 2, 2).to(D)
    a = p(x)
    assert a.shape == (2, 4, 6)
    close(a.sum(), -2.02411)
    close(a.abs().sum(), 53.2504)
    close(a[0, 0], [-3.94366, 1.56374, 0.114327, 1.55361, 0.537765, -0.504684])
    close(a[1, 3], [0.028782, 1.85912, 0.365637, 0.327429, -0.0282461, -2.43044])
    close(L.dfm_loss(tokens_to_map(a, (2, 2)), t), 8.74110)
    close(L.dfm_loss(tokens_to_map(a, (2, 2)), t, "frequency"), 8.14026)
    b = p(x, query=qx)
    close(b.sum(), -1.70105)
    close(b.abs().sum(), 53.4087)
    close(b[0, 0], [-3.97539, 1.57566, 0.122893, 1.55439, 0.547707, -0.475190])
    close(L.dfm_loss(tokens_to_map(b, (2, 2)), t), 8.72783)
    close(L.dfm_loss(tokens_to_map(b, (2, 2)), t, "frequency"), 8.75917)


def test_projector_student_and_query_grids_differ():
    p = CrossAttentionProjector(8, 12, (5, 3), (2, 4), heads=3)
    out = p(torch.randn(2, 8, 5, 3))
    assert out.shape == (2, 8, 12)
    with pytest.raises(ModelError, match="student map"):
        p(torch.randn(2, 8, 4, 4))


# --- TV5: wiring with a toy teacher stage ---------------------------------------------------------

class ToyTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6, bias=False)
        self.norm = nn.LayerNorm(6, elementwise_affine=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(6, 6, generator=torch.Generator().manual_seed(2)) * 0.4)


def tv5_setup(draw_s4_query: bool):
    """The reference drew a query tensor for every projector (TV4 order), also the s4 ones whose
    query the chain replaces; ``draw_s4_query`` keeps that draw order."""
    g = torch.Generator().manual_seed(1)
    p3 = nn.ModuleDict({v: CrossAttentionProjector(4, 6, (2, 2), (2, 2), 2) for v in ("sp", "fr")})
    p4 = nn.ModuleDict({v: CrossAttentionProjector(5, 6, (2, 2), (2, 2), 3, self_query=draw_s4_query) for v in ("sp", "fr")})
    for p in (p3["sp"], p3["fr"], p4["sp"], p4["fr"]):
        fill(p, g)
    teacher = ToyTeacher().to(D)
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    stage = TeacherLastStage(teacher, StageSpec("lin", ["lin", "norm"], "tokens"))
    return p3.to(D).train(), p4.to(D).train(), stage, teacher


def test_tv5_full_wiring():
    p3, p4, stage, teacher = tv5_setup(draw_s4_query=True)
    torch.manual_seed(0)
    s3 = torch.randn(2, 4, 2, 2).to(D).requires_grad_()
    s4 = torch.randn(2, 5, 2, 2).to(D).requires_grad_()
    t4 = torch.randn(2, 6, 2, 2).to(D)
    losses = scalekd_losses(s3, s4, t4, p3, p4, stage, (2, 2), (2, 2), (0.08, 0.06), (0.08, 0.06))
    close(losses["s3"], 0.634121)
    close(losses["s3_alt"], 0.535297)
    close(losses["s4"], 0.690103)
    close(losses["s4_alt"], 0.508479)
    close(sum(losses.values()), 2.36800)
    z3 = stage.to_map(stage(p3["sp"](s3), (2, 2)), (2, 2))
    close(z3[0, :, 0, 0], [0.112119, 0.585274, -2.20339, 0.581328, 0.572937, 0.351736])
    y4 = p4["sp"](s4, query=z3.flatten(2).transpose(1, 2))
    close(y4[0, 0], [-0.712274, 2.09180, -0.381392, -1.23321, -2.31577, 0.132285])
    # gradients reach the student and every projector (s4 losses also reach P3 through the
    # chained query), never the teacher's weights
    sum(losses.values()).backward()
    assert s3.grad is not None and s3.grad.abs().sum() > 0 and s4.grad.abs().sum() > 0
    for proj in (*p3.values(), *p4.values()):
        assert proj.q.weight.grad is not None and proj.q.weight.grad.abs().sum() > 0
    assert teacher.lin.weight.grad is None
    p3.zero_grad()
    (losses_s4 := scalekd_losses(s3, s4, t4, p3, p4, stage, (2, 2), (2, 2), (0.0, 0.0), (0.08, 0.06)))
    sum(losses_s4.values()).backward()
    assert p3["sp"].q.weight.grad.abs().sum() > 0


def test_s4_projector_has_no_unused_parameters():
    p = CrossAttentionProjector(5, 6, (2, 2), (2, 2), 3, self_query=False)
    assert p.query is None
    out = p(torch.randn(2, 5, 2, 2), query=torch.randn(2, 4, 6))
    out.sum().backward()
    assert all(q.grad is not None for q in p.parameters())


# --- teacher and student stages --------------------------------------------------------------------

def test_stage_specs_for_timm_teachers():
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, img_size=64, embed_dim=24,
                             depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
    sp = teacher_stage_spec(swin)
    assert (sp.s3_tap, sp.modules, sp.layout) == ("layers.2", ["layers.3", "norm"], "nhwc")
    vit = timm.create_model("deit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=4)
    sp = teacher_stage_spec(vit)
    assert sp.layout == "tokens" and sp.s3_tap == "blocks.2" and sp.modules == ["blocks.3", "norm"]
    assert sp.prefix_tokens == 1 and sp.s4_modules == ("blocks.3", "norm")
    res = timm.create_model("resnet18", num_classes=3)
    assert teacher_stage_spec(res).modules == ["layer4"]
    cnx = timm.create_model("convnext_atto", num_classes=3)
    assert teacher_stage_spec(cnx).s3_tap == "stages.2"
    with pytest.raises(ModelError, match="teacher_s3_tap"):
        teacher_stage_spec(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


def test_tpp_through_a_swin_stage_keeps_shapes_and_teacher_frozen():
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, img_size=64, embed_dim=24,
                             depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4).eval()
    for prm in swin.parameters():
        prm.requires_grad_(False)
    stage = TeacherLastStage(swin, teacher_stage_spec(swin))
    proj = CrossAttentionProjector(16, 96, (3, 3), (4, 4), heads=2)
    x = torch.randn(2, 16, 3, 3, requires_grad=True)
    z = stage.to_map(stage(proj(x), (4, 4)), (2, 2))
    assert z.shape == (2, 192, 2, 2)
    z.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in swin.parameters())


def test_student_stage_taps():
    from medistill.models.factory import create_model
    from medistill.models.taps import list_taps

    for arch, expected in [("resnet18", ("layer3", "layer4")), ("cnn5", ("conv4", "conv5"))]:
        m = create_model(arch, 3, 3, 32)

        def probe(names, m=m):
            shapes = dict(list_taps(m, 32, 3, 3))
            return {n: shapes[n] for n in names if n in shapes}

        assert student_stage_taps(m, probe) == expected


# --- end to end ------------------------------------------------------------------------------------

TEACHERS = {
    "swin": {"model": "swin_tiny_patch4_window7_224", "input_size": 32,
             "kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 2], "window_size": 2, "patch_size": 2}},
    "deit": {"model": "deit_tiny_patch16_224", "input_size": 32,
             "kwargs": {"patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2}},
    "resnet": {"model": "resnet18", "input_size": 32, "small_input": "stride16"},
}


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_scalekd_end_to_end(tmp_path, tiny_npz, kind):
    """A toy Swin, ViT or ResNet teacher at 32 px (the data is 16 px: the teacher sees it
    upsampled) and a cnn5 student at 16 px: every term logged, projector parameters reported,
    the teacher's weights untouched, only the student saved."""
    from medistill.config import load_config
    from medistill.distill.engine import Engine
    from medistill.distill.methods import method_terms

    teacher_dir = tmp_path / "teacher"
    base = {"data": {"name": str(tiny_npz)}, "train": {"epochs": 1, "batch_size": 8, "threads": 1, "progress": False,
                                                     "latency": False}}
    t_cfg = load_config(None, [], base={**base, "out": str(teacher_dir), "students": [{"name": "t", **TEACHERS[kind]}]})
    Engine(t_cfg).run()
    out = tmp_path / "skd"
    cfg = load_config(None, [], base={**base, "out": str(out),
                                      "teachers": [{"name": "t", "checkpoint": str(teacher_dir)}],
                                      "students": [{"name": "s", "model": "cnn5", "input_size": 16}],
                                      "terms": method_terms("scalekd", 1)})
    from safetensors.torch import load_file

    before = load_file(str(teacher_dir / "students" / "t" / "model.safetensors"))
    Engine(cfg).run()
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = hist[-1]["train"]["s"]
    for k in ("ce", "soft_ce", "scalekd", "scalekd.s3", "scalekd.s3_alt", "scalekd.s4", "scalekd.s4_alt"):
        assert k in logged and logged[k] == logged[k]
    info = json.loads((out / "run_info.json").read_text())
    assert info["term_parameters"]["s.scalekd"] > 0
    after = load_file(str(teacher_dir / "students" / "t" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = load_file(str(out / "students" / "s" / "model.safetensors"))
    assert not any("proj" in k or "query" in k for k in saved)


def _setup(teacher: nn.Module, student: nn.Module, size: int):
    from medistill.distill.terms import TermSetup
    from medistill.models.taps import FeatureTaps

    models = {"t": teacher.eval(), "s": student}

    def probe(name, taps):
        with FeatureTaps(models[name], taps, detach=True) as rec, torch.no_grad():
            models[name].eval()(torch.zeros(2, 3, size, size))
        return {k: (1, *v.shape[1:]) for k, v in rec.outputs.items()}

    return TermSetup(students=["s"], teachers=["t"], num_classes=3, class_counts=torch.ones(3), tap_shapes={},
                     models=models, probe=probe)


def test_scalekd_refusals():
    import timm

    from medistill.distill.terms import make_term_unbuilt
    from medistill.errors import ConfigError
    from medistill.models.factory import create_model

    teacher = timm.create_model("resnet18", num_classes=3)           # no small-input stem: 1×1 at 32 px
    student = create_model("cnn5", 3, 3, 32)
    setup = _setup(teacher, student, 32)
    term = make_term_unbuilt("scalekd", "s", {}, setup)
    setup.tap_shapes = {p: setup.probe(p, sorted(t)) for p, t in term.taps().items()}
    with pytest.raises(ModelError, match="1×1 map here, where the frequency view is identically zero"):
        term.build(setup)
    ok = make_term_unbuilt("scalekd", "s", {"alpha3": [0.08, 0.0], "alpha4": [0.08, 0.0]}, setup)
    ok.build(setup)                                                   # spatial view only: allowed
    assert sum(p.numel() for p in ok.parameters()) > 0
    with pytest.raises(ConfigError, match="BatchNorm"):
        make_term_unbuilt("scalekd", "s", {"teacher_train_mode": True}, setup)
    with pytest.raises(ConfigError, match="go together"):
        make_term_unbuilt("scalekd", "s", {"teacher_s3_tap": "layer3"}, setup)


def test_rescale_49_multiplies_every_feature_loss():
    import timm

    from medistill.distill.context import StepContext
    from medistill.distill.terms import make_term_unbuilt
    from medistill.models.factory import create_model
    from medistill.models.taps import FeatureTaps

    teacher = timm.create_model("resnet18", num_classes=3).eval()     # layer4: 2×2 at 64 px
    student = create_model("cnn5", 3, 3, 64)
    setup = _setup(teacher, student, 64)
    x = torch.rand(4, 3, 64, 64)
    out = {}
    for rescale in (False, True):
        torch.manual_seed(0)
        term = make_term_unbuilt("scalekd", "s", {"rescale_49": rescale}, setup)
        setup.tap_shapes = {p: setup.probe(p, sorted(t)) for p, t in term.taps().items()}
        term.build(setup)
        feats = {}
        for name, model in (("t", teacher), ("s", student.train())):
            with FeatureTaps(model, sorted(term.taps()[name])) as rec:
                model(x)
            feats[name] = dict(rec.outputs)
        ctx = StepContext({}, feats, torch.zeros(4, dtype=torch.long), 1.0, torch.ones(3), torch.ones(3) / 3, ["t"], ["s"])
        torch.manual_seed(1)
        out[rescale] = term(ctx)[1]
    assert term.grid4 == (2, 2)
    for k in ("s3", "s3_alt", "s4", "s4_alt"):
        assert float(out[True][k]) == pytest.approx(float(out[False][k]) * 49 / 4, rel=1e-5)
