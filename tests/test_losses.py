"""Every loss against methods.md §H vectors and against a naive per-sample reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medistill import losses as L

S = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
T = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
Y = torch.tensor([0])


def approx(a: torch.Tensor | float, b: float, tol: float = 1e-6) -> bool:
    return abs(float(a) - b) < tol


# ---- naive references (explicit loops, numpy, float64) ----
def softmax(z: np.ndarray, tau: float = 1.0) -> np.ndarray:
    e = np.exp((z - z.max()) / tau)
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))


def naive_kd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    return float(np.mean([tau * tau * kl(softmax(ti, tau), softmax(si, tau)) for si, ti in zip(s, t)]))


def naive_dkd(s: np.ndarray, t: np.ndarray, y: np.ndarray, tau: float) -> tuple[float, float]:
    tc, nc = [], []
    for si, ti, yi in zip(s, t, y):
        ps, pt = softmax(si, tau), softmax(ti, tau)
        tc.append(kl([pt[yi], 1 - pt[yi]], [ps[yi], 1 - ps[yi]]))
        mask = np.arange(len(si)) != yi
        nc.append(kl(softmax(ti[mask], tau), softmax(si[mask], tau)))
    return tau * tau * float(np.mean(tc)), tau * tau * float(np.mean(nc))


@pytest.fixture
def rnd() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(7, 5, generator=g, dtype=torch.float64) * 3, torch.randn(7, 5, generator=g, dtype=torch.float64) * 3,
            torch.randint(0, 5, (7,), generator=g))


def test_kd_vectors() -> None:
    assert approx(L.kd_loss(S, T, 1.0), 1.150421)
    assert approx(L.kd_loss(S, T, 4.0), 1.319630)
    ce = F.cross_entropy(S, Y)
    assert approx(ce, 2.407606)
    assert approx(0.1 * ce + 0.9 * L.kd_loss(S, T, 4.0), 1.428428)


def test_kd_matches_naive(rnd) -> None:
    s, t, _ = rnd
    for tau in (1.0, 4.0):
        assert approx(L.kd_loss(s, t, tau), naive_kd(s.numpy(), t.numpy(), tau), 1e-9)


def test_dkd_vectors_and_identity() -> None:
    tc, nc = L.dkd_parts(S, T, Y, 1.0)
    assert approx(tc, 0.995723) and approx(nc, 0.462117)
    tc, nc = L.dkd_parts(S, T, Y, 4.0)
    assert approx(tc, 1.030747) and approx(nc, 0.497412)
    pt = F.softmax(T / 4, -1)[0, 0]
    assert approx(tc + (1 - pt) * nc, float(L.kd_loss(S, T, 4.0)))
    assert approx(L.dkd_loss(S, T, Y, 1.0, 8.0, 4.0), 1.030747 + 8 * 0.497412, 1e-5)


def test_dkd_matches_naive(rnd) -> None:
    s, t, y = rnd
    tc, nc = L.dkd_parts(s, t, y, 4.0)
    ntc, nnc = naive_dkd(s.numpy(), t.numpy(), y.numpy(), 4.0)
    assert approx(tc.mean(), ntc, 1e-9) and approx(nc.mean(), nnc, 1e-9)


def test_dkd_extreme_logits_finite() -> None:
    s = torch.tensor([[100.0, -100.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-100.0, 100.0, 0.0]])
    loss = L.dkd_loss(s, t, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_entropy_confidence_vectors() -> None:
    w = L.entropy_confidence(torch.tensor([[10.0, 0, 0, 0], [2, 1, 0, 0], [0, 0, 0, 0]]))
    assert approx(w[0], 0.998919) and approx(w[1], 0.243519) and abs(float(w[2])) < 1e-7


def test_focal() -> None:
    assert approx(L.focal_loss(torch.zeros(1, 2), torch.tensor([0])), 0.25 * math.log(2))
    z, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    assert approx(L.focal_loss(z, y, gamma=0.0), float(F.cross_entropy(z, y)), 1e-6)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    naive = np.mean([-float(w[yi]) * (1 - float(F.softmax(zi, -1)[yi])) ** 2 * float(F.log_softmax(zi, -1)[yi]) for zi, yi in zip(z, y)])
    assert approx(L.focal_loss(z, y, 2.0, w), naive, 1e-5)


def test_class_balanced_weights() -> None:
    w = L.class_balanced_weights([100, 10], 0.99)
    assert approx(w[0], 0.262116) and approx(w[1], 1.737884)
    assert approx(L.class_balanced_weights([5, 7, 9], 0.999).sum(), 3.0, 1e-5)
    assert torch.allclose(L.class_balanced_weights([5, 7], 0.0), torch.ones(2))


def test_logit_adjusted() -> None:
    prior = torch.tensor([0.9, 0.1])
    assert approx(L.logit_adjusted_ce(torch.zeros(1, 2), torch.tensor([1]), prior), 2.302585)
    assert approx(L.logit_adjusted_ce(torch.zeros(1, 2), torch.tensor([0]), prior), 0.105361)
    z, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    assert approx(L.logit_adjusted_ce(z, y, torch.full((3,), 1 / 3)), float(F.cross_entropy(z, y)), 1e-6)


def test_nd_vectors() -> None:
    s, c, y = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert approx(L.nd_loss(s, torch.tensor([[0.0, 2.0]]), c, y), 0.4)
    assert approx(L.nd_loss(s, torch.tensor([[0.0, 10.0]]), c, y), 0.7)
    assert approx(L.nd_loss(torch.tensor([[6.0, 0.0]]), torch.tensor([[0.0, 5.0]]), c, y), 0.0)
    assert approx(L.nd_loss(torch.tensor([[0.0, 6.0]]), torch.tensor([[0.0, 5.0]]), c, y), 1.0)


def test_aggregate_teachers() -> None:
    z = [torch.tensor([[4.0, 0.0]]), torch.zeros(1, 2)]
    assert torch.allclose(L.aggregate_teachers(z, "prob_mean"), torch.tensor([[0.741007, 0.258993]]), atol=1e-6)
    assert torch.allclose(L.aggregate_teachers(z, "logit_mean"), torch.tensor([[0.880797, 0.119203]]), atol=1e-6)
    # static weights are normalised; weight on one teacher alone returns it
    assert torch.allclose(L.aggregate_teachers(z, "prob_mean", weights=[3.0, 0.0]), F.softmax(z[0], -1))


def test_at_vector() -> None:
    a = torch.zeros(1, 1, 2, 2)
    a[0, 0, 0, 0] = 1
    b = torch.zeros(1, 1, 2, 2)
    b[0, 0, 1, 1] = 1
    assert approx(L.at_loss(a, b), 0.5)
    assert approx(1000 * L.at_loss(a, b), 500.0, 1e-4)


def test_dml_vectors() -> None:
    z1, z2 = torch.tensor([[1.0, 0, 0]]), torch.tensor([[0.0, 1, 0]])
    assert approx(L.peer_kl(z1, z2, 1.0), 0.364175)
    assert approx(F.cross_entropy(z1, Y) + L.peer_kl(z1, z2, 1.0), 0.915620)
    assert approx(F.cross_entropy(z2, Y) + L.peer_kl(z2, z1, 1.0), 1.915620)
    assert approx(L.peer_kl(z1, z1.clone(), 1.0), 0.0)


def test_dho_combination() -> None:
    p = L.dho_combine(torch.tensor([[2.0, 0, 0]]), torch.tensor([[0.0, 1, 0]]), 0.5, 1.0)
    assert torch.allclose(p, torch.tensor([[0.49946, 0.34131, 0.15922]]), atol=1e-5)
    assert int(L.dho_combine(torch.tensor([[2.0, 0, 0]]), torch.tensor([[0.0, 1, 0]]), 0.0, 1.0).argmax()) == 1


# ---- dual student (B.7) ----
def test_dual_student_vector() -> None:
    l1, l2 = L.dual_student_losses(torch.zeros(1, 4), torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[2.0, 1, 0, 0]]), Y)
    assert approx(l1, 0.609996) and approx(l2, 0.328881)


def test_dual_student_gradient_isolation_and_reductions() -> None:
    s1 = torch.randn(4, 5, requires_grad=True)
    s2 = torch.randn(4, 5, requires_grad=True)
    t, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    l1, l2 = L.dual_student_losses(s1, s2, t, y)
    l1.backward()
    assert s2.grad is None and s1.grad is not None
    # uniform teacher ⇒ zero teacher term: with gamma = 0 only alpha·CE remains
    a, _ = L.dual_student_losses(s1, s2, torch.zeros(4, 5), y, alpha=0.4, beta=0.4, gamma=0.0)
    assert approx(a, 0.4 * float(F.cross_entropy(s1, y)), 1e-6)


def test_dual_student_equals_kd_when_unweighted() -> None:
    s1, s2 = torch.randn(3, 4), torch.randn(3, 4)
    t, y = torch.tensor([[50.0, 0, 0, 0]] * 3), torch.tensor([0, 1, 2])  # w ≈ 1
    l1, _ = L.dual_student_losses(s1, s2, t, y, alpha=0.3, beta=0.7, gamma=0.0)
    ref = 0.3 * F.cross_entropy(s1, y) + 0.7 * L.kd_loss(s1, t, 4.0)
    assert approx(l1, float(ref), 1e-5)


# ---- UMKD (A.13) ----
def test_evidential_confidence() -> None:
    assert approx(L.evidential_confidence(torch.zeros(4)), 0.25)
    assert approx(L.evidential_confidence(torch.tensor([2.0, 0, 0, 0])), 0.483445)
    assert approx(L.evidential_confidence(torch.tensor([3.0, 2, 1])), 0.463793)
    assert approx(L.evidential_confidence(torch.tensor([2.0, 0, 0, 0]), lambda1=0.5), 0.624375)


def test_udd_vectors() -> None:
    u = L.evidential_confidence(T)[:, None]
    assert approx(L.udd_loss(S[:, :, None], T[:, :, None], Y, 1.0, confidence=u), 4.435579, 1e-5)
    assert approx(L.udd_loss(S[:, :, None], T[:, :, None], Y, 4.0, confidence=u), 4.673275, 1e-5)
    zt = torch.tensor([[[3.0, 1.0], [2.0, 2.0], [1.0, 3.0]]], dtype=torch.float64)
    zs = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]], dtype=torch.float64)
    uu = L.evidential_confidence(zt.transpose(1, 2))
    assert approx(L.udd_loss(zs, zt, Y, 4.0, confidence=uu), 3.449425, 1e-5)


def test_udd_reduces_to_dkd(rnd) -> None:
    s, t, y = rnd
    dkd = float(L.dkd_loss(s, t, y, 1.0, 8.0, 4.0))
    assert approx(L.udd_loss(s[:, :, None], t[:, :, None], y, 4.0, eps=0.0), dkd, 1e-9)
    # identical partitions: every region equal ⇒ multi-region SDD-DKD equals single-region DKD
    n = 5
    assert approx(L.udd_loss(s[:, :, None].expand(-1, -1, n), t[:, :, None].expand(-1, -1, n), y, 4.0, eps=0.0), dkd, 1e-9)


def test_udd_official_order_differs() -> None:
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    y = torch.tensor([0, 1, 2])
    u = torch.rand(3, 5, generator=g)
    a = L.udd_loss(zs, zt, y, confidence=u)
    b = L.udd_loss(zs, zt, y, confidence=u, official_uc_order=True)
    assert not torch.isclose(a, b)
    # with one sample the two orders coincide
    assert torch.isclose(L.udd_loss(zs[:1], zt[:1], y[:1], confidence=u[:1]),
                         L.udd_loss(zs[:1], zt[:1], y[:1], confidence=u[:1], official_uc_order=True))


def test_mmd2() -> None:
    x = torch.zeros(4, 2)
    x[:, 0] = 1
    y = torch.zeros(4, 2)
    y[:, 1] = 1
    assert approx(L.mmd2(x, y), 11.706640, 1e-5)
    z = torch.randn(5, 3, 2, 2)
    assert float(L.mmd2(z, z)) == 0.0
    # against a naive double loop over pairs (float64), including unequal set sizes
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    sig = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)

    def k(u: torch.Tensor, v: torch.Tensor) -> float:
        d = max(float(((u - v) ** 2).sum()), 1e-12)
        return sum(math.exp(-d / (2 * s * s)) for s in sig)

    ref = (sum(k(u, v) for u in an for v in an) / 16 + sum(k(u, v) for u in bn for v in bn) / 36
           - 2 * sum(k(u, v) for u in an for v in bn) / 24)
    got = L.mmd2(a, b)
    assert got.dtype == torch.float64 and abs(float(got) - max(ref, 0.0)) < 1e-10
    # under bf16 autocast (train.bf16) the kernel still computes in float32
    a, b = torch.randn(6, 32), torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = L.mmd2(a, b)
    assert got.dtype == torch.float32 and torch.equal(got, L.mmd2(a, b))


def test_multiscale_lowpass() -> None:
    assert torch.allclose(L.multiscale_lowpass(torch.full((2, 8, 7, 7), 3.0)), torch.full((2, 8, 7, 7), 3.0))
    assert torch.all(L.multiscale_lowpass(torch.full((1, 4, 6, 6), -1.0)) == 0)
    assert L.multiscale_lowpass(torch.randn(2, 64, 56, 56)).shape == (2, 64, 56, 56)


def test_region_logits_shapes_and_global_region() -> None:
    fc = torch.nn.Linear(16, 5)
    f = torch.randn(2, 16, 8, 8).relu()
    z = L.region_logits(f, fc)
    assert z.shape == (2, 5, 21)
    assert L.region_logits(f, fc, scales=(1, 2)).shape == (2, 5, 5)
    exact = L.region_logits(f, fc, cascade=False)
    assert torch.allclose(exact[:, :, 0], fc(f.mean((2, 3))), atol=1e-5)
    # on a 7×7 map the cascade's global region is not the plain mean (methods.md A.6 pitfall)
    f7 = torch.randn(2, 16, 7, 7).relu()
    assert not torch.allclose(L.region_logits(f7, fc)[:, :, 0], fc(f7.mean((2, 3))), atol=1e-4)
    with pytest.raises(Exception, match="smaller than the finest region scale"):
        L.region_logits(torch.randn(1, 16, 2, 2), fc)


def test_single_class_batch_is_finite() -> None:
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4)
    y = torch.zeros(5, dtype=torch.long)
    total = L.kd_loss(s, t) + L.dkd_loss(s, t, y) + L.focal_loss(s, y) + L.udd_loss(s[:, :, None], t[:, :, None], y)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(s.grad).all()
