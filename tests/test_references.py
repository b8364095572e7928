"""Independent references for the research terms: each is recomputed here from its definition with
plain loops (probabilities, kernels and KL divergences written out, float64), on fixed inputs, and
compared in value *and* gradient with what the term computes. The references share no code with
``medistill.losses`` beyond the modules whose parameters the term owns (the CFL block)."""

from __future__ import annotations

import math

import pytest
import torch

from medistill.distill.context import StepContext
from medistill.distill.terms import TermSetup, make_term
from medistill.losses import functional as L


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def naive_udd(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, tau: float, alpha: float, beta: float,
              u: torch.Tensor, cw: float = 2.0, eps: float = 1e-7) -> torch.Tensor:
    """UMKD's UDD (docs/specs/methods.md A.6) written out: for every sample b and region n, DKD's
    TCKD (binary target/other KL) and NCKD (KL over the other classes, renormalised), weighted by
    (2 + u) and (1 − u), averaged over the R = B·N rows, and doubled where the teacher's region
    prediction disagrees in correctness with its global one. Differentiable in ``zs`` (torch ops
    per scalar, so autograd gives the reference gradient)."""
    b, c, n = zs.shape
    r = b * n
    total = zs.new_zeros(())
    for i in range(b):
        t_correct_global = int(zt[i, :, 0].argmax()) == int(y[i])
        for k in range(n):
            s = zs[i, :, k] / tau
            t = (zt[i, :, k] / tau).tolist()
            pt = _softmax(t)
            ps = torch.softmax(s, 0)
            g = int(y[i])
            bt = [pt[g], 1 - pt[g]]
            bs = torch.stack([ps[g], 1 - ps[g]])
            tckd = sum(bt[j] * (math.log(bt[j]) - torch.log(bs[j])) for j in range(2)) * tau ** 2
            others = [j for j in range(c) if j != g]
            qt = [pt[j] / (1 - pt[g]) for j in others]
            qs = torch.stack([ps[j] for j in others]) / (1 - ps[g])
            nckd = sum(qt[m] * (math.log(qt[m]) - torch.log(qs[m])) for m in range(len(others))) * tau ** 2
            idx = 1.0 if k == 0 or (int(zt[i, :, k].argmax()) == g) == t_correct_global else cw
            uk = float(u[i, k])
            total = total + idx * ((alpha * tckd / r + eps) * (2 + uk) + (beta * nckd / r + eps) * (1 - uk))
    return total


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_udd_against_its_definition_values_and_gradients(tau: float) -> None:
    g = torch.Generator().manual_seed(7)
    zs = torch.randn(3, 5, 4, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(3, 5, 4, generator=g, dtype=torch.float64) * 2
    y = torch.tensor([0, 3, 1])
    u = torch.rand(3, 4, generator=g, dtype=torch.float64)
    a = zs.clone().requires_grad_(True)
    b = zs.clone().requires_grad_(True)
    ours = L.udd_loss(a, zt, y, tau, alpha=1.0, beta=8.0, confidence=u)
    ref = naive_udd(b, zt, y, tau, 1.0, 8.0, u)
    assert float(ours) == pytest.approx(float(ref), rel=1e-9)
    ours.backward()
    ref.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-10)


def naive_mmd2(x: torch.Tensor, y: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Biased MMD² (A.4) with every kernel entry summed in a loop: rows flattened and L2-normalised,
    Gaussian kernels at each bandwidth, squared distances floored at 1e-12, the result at 0."""
    x = x.flatten(1)
    y = y.flatten(1)
    x = x / x.norm(dim=1, keepdim=True)
    y = y / y.norm(dim=1, keepdim=True)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = torch.clamp(((a - b) ** 2).sum(), min=1e-12)
        return sum(torch.exp(-d / (2 * s * s)) for s in sigmas)

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n)) / n ** 2
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return torch.clamp(kxx + kyy - 2 * kxy, min=0.0)


def test_cfa_term_against_its_definition_values_and_gradients() -> None:
    """CFA = Σ_e MMD²(h_S, h_T,e) + recon_weight · Σ_e MSE(r_e, F_T,e), with h and r from the
    term's own CFL block (its parameters are the term's); the loss around them is recomputed."""
    torch.manual_seed(0)
    shapes = {"s": {"layer4": (1, 6, 3, 3)}, "e1": {"layer4": (1, 8, 3, 3)}, "e2": {"layer4": (1, 5, 3, 3)}}
    setup = TermSetup(students=["s"], teachers=["e1", "e2"], num_classes=3, class_counts=torch.ones(3),
                      tap_shapes=shapes, models={})
    sig = [0.05, 0.2, 1.0, 2.0]
    term = make_term("cfa", "s", {"hidden": 4, "recon_weight": 0.7, "sigmas": sig, "student_tap": "layer4",
                                  "expert_tap": "layer4"}, setup).double()
    fs = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    fe = {"e1": torch.randn(4, 8, 3, 3, dtype=torch.float64), "e2": torch.randn(4, 5, 3, 3, dtype=torch.float64)}
    ctx = StepContext(logits={}, feats={"s": {"layer4": fs}, "e1": {"layer4": fe["e1"]}, "e2": {"layer4": fe["e2"]}},
                      target=torch.zeros(4, dtype=torch.long), epoch=0.0, class_counts=torch.ones(3),
                      class_prior=torch.ones(3) / 3, teachers=["e1", "e2"], students=["s"])
    value, diag = term(ctx)
    (g_ours,) = torch.autograd.grad(value, fs)
    hs, hts, recs = term.cfl(fs, [fe["e1"], fe["e2"]])
    mmd = sum(naive_mmd2(hs, ht, sig) for ht in hts)
    rec = sum(((r - f) ** 2).sum() / f.numel() for r, f in zip(recs, [fe["e1"], fe["e2"]]))
    ref = mmd + 0.7 * rec
    (g_ref,) = torch.autograd.grad(ref, fs)
    assert float(value) == pytest.approx(float(ref), rel=1e-9)
    assert float(diag["mmd"]) == pytest.approx(float(mmd), rel=1e-9)
    assert torch.allclose(g_ours, g_ref, atol=1e-10)
    assert g_ref.abs().sum() > 0


def _divergence_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from medistill import dist as mdist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)                       # the same module on both ranks …
        bn = torch.nn.BatchNorm1d(3)
        lin = torch.nn.Linear(3, 2)
        with torch.no_grad():
            lin.weight[0, 1] += 0.25 * rank        # … but one weight 0.25 apart on rank 1
        bn.train()
        bn(torch.full((4, 3), float(rank)))        # running stats differ: each rank saw its own batch
        tensors = [*lin.parameters(), *bn.buffers()]
        got = mdist.replica_divergence(tensors)
        same = mdist.replica_divergence(list(lin.parameters())[1:])   # the bias: equal on both ranks
        torch.save({"got": got, "same": same}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_replica_divergence_on_its_own_with_buffers(tmp_path) -> None:
    """Two gloo ranks: the largest distance of any rank's value from the mean over ranks, over
    parameters and buffers (BatchNorm running stats, its int64 step count) together."""
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rdv'}"
    out = str(tmp_path / "res")
    mp.spawn(_divergence_rank, args=(2, init, out), nprocs=2, join=True)
    res = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    # running_mean after one step with momentum 0.1: 0.1 · rank → ranks 0.0 and 0.1, mean 0.05;
    # the weight: 0.25 apart → 0.125 from the mean, the largest of all
    assert res[0]["got"] == res[1]["got"] == pytest.approx(0.125, abs=1e-6)
    assert res[0]["same"] == res[1]["same"] == 0.0


# --- ScaleKD: projector and feature losses end to end ------------------------------------------

def _naive_projector(p: torch.nn.Module, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
    """ScaleKD's cross-attention projector (docs/specs/scalekd.md §2.1) written out with the
    module's parameters only: the 3×3 convolution as a sum over the 9 shifted copies of the padded
    map, BatchNorm from the batch's own mean and biased variance (training mode), a per-head loop
    of softmax(q·kᵀ · d^-½ · scale)·v, LayerNorm from its definition, the residual FFN."""
    prm = dict(p.named_parameters())
    b, cs, h, w = x.shape
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    wconv = prm["proj_student.0.weight"]                                   # [Cs, Cs, 3, 3]
    y = prm["proj_student.0.bias"][None, :, None, None].expand(b, cs, h, w)
    for di in range(3):
        for dj in range(3):
            y = y + torch.einsum("oc,bchw->bohw", wconv[:, :, di, dj], xp[:, :, di:di + h, dj:dj + w])
    mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (y - mean) / torch.sqrt(var + 1e-5) * prm["proj_student.1.weight"][None, :, None, None] \
        + prm["proj_student.1.bias"][None, :, None, None]
    keys = (torch.relu(y) + prm["pos_embed"]).flatten(2).transpose(1, 2)                  # [B, Ls, Cs]
    qh, qw = p.query_hw
    if query is None:
        q0 = prm["query.weight"].reshape(qh * qw, -1)[None].expand(b, -1, -1)              # [B, Lq, Ct]
    else:
        q0 = query
    wpos = prm["proj_pos.0.weight"][:, :, 0, 0]
    queries = torch.relu(q0 @ wpos.T + prm["proj_pos.0.bias"])
    lin = lambda t, n: t @ prm[f"{n}.weight"].T + prm[f"{n}.bias"]       # noqa: E731
    q, k, v = lin(queries, "q"), lin(keys, "k"), lin(keys, "v")
    ct = q.shape[-1]
    d = ct // p.heads
    heads = []
    for i in range(p.heads):
        sl = slice(i * d, (i + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) * d ** -0.5 * p.softmax_scale
        e = torch.exp(logits - logits.max(-1, keepdim=True).values)
        heads.append((e / e.sum(-1, keepdim=True)) @ v[..., sl])
    o = lin(torch.cat(heads, -1), "proj")
    o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + 1e-5) \
        * prm["norm.weight"] + prm["norm.bias"]
    return o + lin(torch.relu(lin(o, "fc1")), "fc2")


def _naive_dfm(s: torch.Tensor, t: torch.Tensor, frequency: bool) -> torch.Tensor:
    """(1/B)·Σ (n(S) − n(T))², n = division by the channel norm at each position; the frequency
    view drops the DCT's DC coefficient, which for the orthonormal DCT-II is the spatial mean.
    The student map is taken in float32, as the term takes it (a bf16 map under autocast is
    compared in float32): in float64 the gradients differ by float32 rounding, amplified where
    the frequency view leaves short channel vectors to normalise (3e-4 relative on this input)."""
    s = s.float()
    if frequency:
        s, t = s - s.mean((2, 3), keepdim=True), t - t.mean((2, 3), keepdim=True)
    ns = s / s.pow(2).sum(1, keepdim=True).sqrt()
    nt = t / t.pow(2).sum(1, keepdim=True).sqrt()
    return (ns - nt).pow(2).sum() / s.shape[0]


def test_scalekd_projector_and_losses_against_a_written_out_reference() -> None:
    """The projector on its own (learned and chained queries), then ScaleKD's four feature losses
    through a toy teacher stage (Linear + LayerNorm on tokens), values and gradients with respect to
    the student maps and every projector weight, against the written-out reference."""
    from torch import nn

    from medistill.distill.terms.scalekd import (CrossAttentionProjector, StageSpec, TeacherLastStage,
                                                 map_to_tokens, scalekd_losses, tokens_to_map)

    torch.manual_seed(0)
    p = CrossAttentionProjector(4, 6, (3, 2), (2, 2), heads=2).double().train()
    x, qx = torch.randn(2, 4, 3, 2, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    assert torch.allclose(p(x), _naive_projector(p, x), atol=1e-10)
    assert torch.allclose(p(x, query=qx), _naive_projector(p, x, qx), atol=1e-10)

    teacher = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)).double()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    stage = TeacherLastStage(teacher, StageSpec("0", ["0", "1"], "tokens"))
    p3 = nn.ModuleDict({v: CrossAttentionProjector(4, 6, (2, 2), (2, 2), 2) for v in ("sp", "fr")}).double().train()
    p4 = nn.ModuleDict({v: CrossAttentionProjector(5, 6, (2, 2), (2, 2), 3, self_query=False)
                        for v in ("sp", "fr")}).double().train()
    s3 = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    s4 = torch.randn(2, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    t4 = torch.randn(2, 6, 2, 2, dtype=torch.float64)
    a3, a4 = (0.08, 0.06), (0.05, 0.07)

    def reference() -> dict[str, torch.Tensor]:
        out = {}
        for i, (view, suffix) in enumerate((("sp", ""), ("fr", "_alt"))):
            z3 = tokens_to_map(teacher(_naive_projector(p3[view], s3)), (2, 2))
            y4 = _naive_projector(p4[view], s4, map_to_tokens(z3))
            out[f"s3{suffix}"] = a3[i] * _naive_dfm(z3, t4, view == "fr")
            out[f"s4{suffix}"] = a4[i] * _naive_dfm(tokens_to_map(y4, (2, 2)), t4, view == "fr")
        return out

    params = [s3, s4, *p3.parameters(), *p4.parameters()]
    got, want = scalekd_losses(s3, s4, t4, p3, p4, stage, (2, 2), (2, 2), a3, a4), reference()
    assert set(got) == set(want) == {"s3", "s3_alt", "s4", "s4_alt"}
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-7), (k, float(got[k]), float(want[k]))
    g_got = torch.autograd.grad(sum(got.values()), params, allow_unused=True)
    g_want = torch.autograd.grad(sum(want.values()), params, allow_unused=True)
    # float32 rounding in the two normalisations differs, amplified where the frequency view leaves
    # short channel vectors on a 2×2 map: up to ≈ 5e-5 of the largest gradient entry; the tolerance
    # is 1e-3 of it (a 1 % change of the attention scale moves the gradients by far more)
    scale = max(float(g.abs().max()) for g in g_want if g is not None)
    for n, (g1, g2) in enumerate(zip(g_got, g_want)):
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            assert torch.allclose(g1, g2, rtol=1e-3, atol=1e-3 * scale), (n, g1.shape, float((g1 - g2).abs().max()), scale)
    assert float(g_got[0].abs().sum()) > 0 and float(g_got[1].abs().sum()) > 0
