"""Pure loss functions. Shapes: ``B`` batch, ``C`` classes, ``N`` regions, logits ``[B, C]``.

KL direction everywhere: KL(target ‖ student), target = teacher or peer distribution. Soft
losses are summed over classes and averaged over the batch ("batchmean"), never divided by C.
Equations and defaults follow ``docs/specs/methods.md`` (sections named per function).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _kl_rows(target_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """Per-row KL(p ‖ q) from log-probabilities, ``[..., C] → [...]``; 0·log 0 = 0."""
    p = target_log_probs.exp()
    return (p * (target_log_probs - student_log_probs)).sum(-1)


def kd_per_sample(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    """``τ²·KL(target ‖ σ_τ(student))`` per sample, ``[B]``; ``target_probs`` already at τ."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = torch.log(target_probs.clamp_min(1e-30))
    return temperature ** 2 * (target_probs * (log_p - log_q)).sum(-1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD (F.1): ``τ²·KL(σ_τ(teacher) ‖ σ_τ(student))``, batch mean."""
    log_p = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    return temperature ** 2 * _kl_rows(log_p, log_q).mean()


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
              temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    """Per-row TCKD and NCKD (τ² included), each ``[R]`` for logits ``[R, C]`` (F.2).

    The binary target/non-target log-probabilities come from log-softmax and a log-sum-exp over
    the non-target classes, so no probability is clamped. Non-target distributions mask the
    target logit (docs/specs/methods.md: "subtract 1000"); here it is set to −inf-like via masked_fill.
    """
    t = teacher_logits.detach() / temperature
    s = student_logits / temperature
    gt = F.one_hot(target, s.shape[-1]).bool()

    def binary(z: Tensor) -> Tensor:
        log_all = torch.logsumexp(z, -1)
        log_t = z.gather(-1, target[:, None]).squeeze(-1) - log_all
        log_nt = torch.logsumexp(z.masked_fill(gt, float("-inf")), -1) - log_all
        return torch.stack([log_t, log_nt], -1)

    tckd = _kl_rows(binary(t), binary(s))
    big = torch.finfo(s.dtype).min / 4  # finite, so 0·(masked log-prob) stays 0, not NaN
    log_pt = F.log_softmax(t.masked_fill(gt, big), -1)
    log_ps = F.log_softmax(s.masked_fill(gt, big), -1)
    nckd = (log_pt.exp() * (log_pt - log_ps)).masked_fill(gt, 0.0).sum(-1)
    return temperature ** 2 * tckd, temperature ** 2 * nckd


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> Tensor:
    """Decoupled KD (F.2): ``α·TCKD + β·NCKD`` (τ² included), batch mean."""
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature)
    return alpha * tckd.mean() + beta * nckd.mean()


def entropy_confidence(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``1 − H(σ_τ(z)) / log C`` per sample, ``[B]`` in [0, 1] (B.2)."""
    log_p = F.log_softmax(logits / temperature, dim=-1)
    h = -(log_p.exp() * log_p).sum(-1)
    return (1.0 - h / torch.log(torch.tensor(float(logits.shape[-1]), dtype=logits.dtype))).clamp(0.0, 1.0)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, weight: Tensor | None = None) -> Tensor:
    """Focal loss (F.9): ``−a_y (1 − p_y)^γ log p_y``, batch mean. The modulating factor uses the
    *unweighted* softmax probability (KD-OCT's code raises it to the class weight by mistake)."""
    log_p = F.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)
    loss = -((1.0 - log_p.exp()).clamp_min(0.0) ** gamma) * log_p
    if weight is not None:
        loss = loss * weight.to(logits.dtype)[target]
    return loss.mean()


def class_balanced_weights(class_counts: Sequence[int] | Tensor, beta: float = 0.999) -> Tensor:
    """Cui et al. (F.7): ``w_c ∝ (1 − β)/(1 − β^{n_c})``, normalised to sum to C. ``[C]``.

    A class with zero samples gets the weight of a one-sample class (its weight is never used
    by a loss, but must be finite)."""
    n = torch.as_tensor(class_counts, dtype=torch.float64).clamp_min(1.0)
    if beta == 0.0:
        return torch.ones_like(n, dtype=torch.float32)
    eff = (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n)) / (1.0 - beta)
    w = 1.0 / eff
    return (w * len(n) / w.sum()).float()


def balanced_class_weights(class_counts: Sequence[int] | Tensor) -> Tensor:
    """scikit-learn's "balanced" weights ``N / (C·n_c)`` (inverse frequency), ``[C]``."""
    n = torch.as_tensor(class_counts, dtype=torch.float64).clamp_min(1.0)
    return (n.sum() / (len(n) * n)).float()


def adjust_logits(logits: Tensor, class_prior: Tensor, tau: float = 1.0) -> Tensor:
    """Menon et al.'s logit adjustment ``z + τ·log π`` for logits ``[B, C]`` and a prior ``[C]``."""
    prior = torch.as_tensor(class_prior, dtype=logits.dtype, device=logits.device)
    return logits + tau * torch.log(prior.clamp_min(1e-12))


def logit_adjusted_ce(logits: Tensor, target: Tensor, class_prior: Tensor, tau: float = 1.0) -> Tensor:
    """Menon et al. (F.8): ``CE(z + τ·log π, y)``, batch mean."""
    return F.cross_entropy(adjust_logits(logits, class_prior, tau), target)


def nd_loss(student_embedding: Tensor, teacher_embedding: Tensor, class_means: Tensor, target: Tensor) -> Tensor:
    """ND loss (E.1): ``mean_b [1 − ⟨s_b, e_y⟩ / max(‖s_b‖, ‖t_b‖)]`` with ``e_y = c_y/‖c_y‖``.

    ``student_embedding [B, D]`` (projected to the teacher's D if needed), ``teacher_embedding
    [B, D]`` (no gradient), ``class_means [C, D]``, ``target [B]``."""
    e = F.normalize(class_means.to(student_embedding.dtype), dim=-1)[target]
    denom = torch.maximum(student_embedding.norm(dim=-1), teacher_embedding.detach().norm(dim=-1)).clamp_min(1e-12)
    return (1.0 - (student_embedding * e).sum(-1) / denom).mean()


def aggregate_teachers(teacher_logits: Sequence[Tensor], mode: str = "logit_mean", temperature: float = 1.0,
                       weights: Tensor | Sequence[float] | None = None) -> Tensor:
    """Combine M teachers into target probabilities ``[B, C]`` (F.6).

    ``logit_mean``: ``σ_τ(Σ_m π_m z_m)``; ``prob_mean``: ``Σ_m π_m σ_τ(z_m)``. ``weights``: ``[M]``
    per teacher or ``[M, B]`` per sample; normalised to sum to 1 over teachers (uniform if None).
    """
    z = torch.stack([t.detach() for t in teacher_logits])  # [M, B, C]
    m = z.shape[0]
    if weights is None:
        w = torch.full((m, 1), 1.0 / m, dtype=z.dtype, device=z.device)
    else:
        w = torch.as_tensor(weights, dtype=z.dtype, device=z.device)
        if w.dim() == 1:
            w = w[:, None]
        if w.shape[0] != m:
            raise ValueError(f"{w.shape[0]} teacher weights for {m} teachers")
        w = w / w.sum(0, keepdim=True).clamp_min(1e-12)
    w = w[..., None]  # [M, B or 1, 1]
    if mode == "logit_mean":
        return F.softmax((w * z).sum(0) / temperature, -1)
    if mode == "prob_mean":
        return (w * F.softmax(z / temperature, -1)).sum(0)
    raise ValueError(f"unknown aggregation mode {mode!r} (logit_mean, prob_mean)")


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """AT (F.4): ``normalize_L2(vec(mean_c |F_c|^p))``, ``[B, Ch, H, W] → [B, H·W]``."""
    return F.normalize(features.pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_features: Tensor, teacher_features: Tensor, p: float = 2.0) -> Tensor:
    """One stage of attention transfer: mean over B·H·W of squared map differences. The larger
    map is adaptive-average-pooled to the smaller size (channel counts need not match)."""
    hs, ht = student_features.shape[-2:], teacher_features.shape[-2:]
    if hs != ht:
        size = (min(hs[0], ht[0]), min(hs[1], ht[1]))
        student_features = F.adaptive_avg_pool2d(student_features, size)
        teacher_features = F.adaptive_avg_pool2d(teacher_features, size)
    return (attention_map(student_features, p) - attention_map(teacher_features.detach(), p)).pow(2).mean()


def peer_kl(student_logits: Tensor, peer_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``τ²·KL(σ_τ(sg(peer)) ‖ σ_τ(student))``, batch mean (DML, dual-student peer term)."""
    return kd_loss(student_logits, peer_logits.detach(), temperature)


def dual_student_losses(student1_logits: Tensor, student2_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                        alpha: float = 0.4, beta: float = 0.4, gamma: float = 0.2, temperature: float = 4.0,
                        entropy_temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Uncertainty-aware dual-student losses (B.2): ``L_i = α·CE + β·mean_b(w_b·τ²·KL_T) + γ·τ²·KL_peer``
    with ``w = entropy_confidence(teacher, entropy_temperature)``. ``loss_1`` depends on student 2
    only through a detached target, and vice versa."""
    w = entropy_confidence(teacher_logits.detach(), entropy_temperature)
    p_t = F.softmax(teacher_logits.detach() / temperature, -1)
    losses = []
    for own, peer in ((student1_logits, student2_logits), (student2_logits, student1_logits)):
        ce = F.cross_entropy(own, target)
        teach = (w * kd_per_sample(own, p_t, temperature)).mean()
        losses.append(alpha * ce + beta * teach + gamma * peer_kl(own, peer, temperature))
    return losses[0], losses[1]


def dho_combine(ce_logits: Tensor, kd_logits: Tensor, a: float | Tensor = 0.5, b: float | Tensor = 1.0) -> Tensor:
    """DHO inference (E.3): ``a·softmax(z_ce) + (1 − a)·softmax(z_kd / b)``, ``[B, C]``."""
    return a * F.softmax(ce_logits, -1) + (1.0 - a) * F.softmax(kd_logits / b, -1)


# --- UMKD (docs/specs/methods.md §A) -------------------------------------------------------------------

def evidential_confidence(logits: Tensor, lambda1: float = 1.0, lambda2: float = 0.1) -> Tensor:
    """UMKD expert confidence ``u`` (A.6 (2)), ``[..., C] → [...]``: with evidence ``e = softplus(z)``,
    ``u = max_c (e_c + λ2) / (e_c + λ1·(Σ_j e_j − e_c) + λ2·C)``. Higher = more certain."""
    ev = F.softplus(logits)
    c = logits.shape[-1]
    total = ev.sum(-1, keepdim=True)
    return ((ev + lambda2) / (ev + lambda1 * (total - ev) + lambda2 * c)).amax(-1)


def mmd2(x: Tensor, y: Tensor, sigmas: Sequence[float] = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)) -> Tensor:
    """Biased MMD² between two sets on the unit sphere (A.4): rows are flattened over all but the
    batch dimension and L2-normalised; multi-bandwidth Gaussian kernel; squared distances clamped
    at 1e-12; result clamped at 0."""
    # At least float32 even under autocast: with σ = 0.001 the kernel resolves distances far
    # below bf16's precision. float64 inputs stay float64 (float32 would shift the value ~0.6 %).
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return _mmd2(x.to(dtype), y.to(dtype), sigmas)


def _mmd2(x: Tensor, y: Tensor, sigmas: Sequence[float]) -> Tensor:
    x = F.normalize(x.flatten(1), dim=1)
    y = F.normalize(y.flatten(1), dim=1)

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        d = (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min(1e-12)
        return sum(torch.exp(-d / (2.0 * s * s)) for s in sigmas)

    return F.relu(kernel(x, x).mean() + kernel(y, y).mean() - 2.0 * kernel(x, y).mean())


def multiscale_lowpass(features: Tensor, sizes: Sequence[int] = (1, 2, 3, 6)) -> Tensor:
    """Parameter-free multi-scale low-pass filter (A.3 msLF): channels split into ``len(sizes)``
    groups, group g average-pooled to ``sizes[g]²`` and bilinearly resized back; then ReLU.
    ``[B, Ch, H, W] → [B, Ch, H, W]``."""
    h, w = features.shape[-2:]
    groups = torch.tensor_split(features, len(sizes), dim=1)
    out = [F.interpolate(F.adaptive_avg_pool2d(g, s), size=(h, w), mode="bilinear", align_corners=False)
           for g, s in zip(groups, sizes)]
    return F.relu(torch.cat(out, 1))


def region_logits(feature_map: Tensor, classifier: torch.nn.Module, scales: Sequence[int] = (1, 2, 4),
                  cascade: bool = True) -> Tensor:
    """Region logits (A.6 (1)): ``[B, Ch, H, W] → [B, C, N]``, ``N = Σ s²``; region 0 is the global
    one, then each scale row-major. ``cascade`` pools the coarse scales from the finest pooled map
    (official code); otherwise every scale is pooled from the map itself (exact global mean)."""
    g = F.relu(feature_map)
    finest = max(scales)
    if min(g.shape[-2:]) < finest:
        from medistill.errors import ModelError

        raise ModelError(f"feature map {tuple(g.shape[-2:])} is smaller than the finest region scale "
                         f"{finest}; use smaller scales (e.g. spp_scales=[1, 2]) or a larger input")
    top = F.adaptive_avg_pool2d(g, finest)
    regions = [(F.adaptive_avg_pool2d(top if cascade else g, s) if s != finest else top).flatten(2) for s in scales]
    r = torch.cat(regions, 2)                      # [B, Ch, N]
    return classifier(r.transpose(1, 2)).transpose(1, 2)  # [B, C, N]


def udd_loss(student_region_logits: Tensor, teacher_region_logits: Tensor, target: Tensor, temperature: float = 4.0,
             alpha: float = 1.0, beta: float = 8.0, confidence: Tensor | None = None,
             complementary_weight: float = 2.0, eps: float = 1e-7, official_uc_order: bool = False) -> Tensor:
    """UMKD uncertainty-aware decoupled distillation (A.6 (3)–(5)).

    ``student_region_logits``, ``teacher_region_logits``: ``[B, C, N]`` (region 0 global);
    ``confidence``: ``[B, N]`` or None (both weights 1: SDD-DKD; with N = 1, DKD).
    ``L = Σ_k idx_k [(α·TCKD_k/R + ε)(2 + u_k) + (β·NCKD_k/R + ε)(1 − u_k)]`` over the R = B·N rows,
    ``idx_k = complementary_weight`` where the teacher's local prediction disagrees in correctness
    with its global one. ``official_uc_order`` reproduces the official code's pairing of the
    sample-major confidences with region-major rows (docs/specs/methods.md A.6 [BUG?]).
    """
    b, c, n = student_region_logits.shape
    # Region-major rows, as in the official code: row k ↔ (region k // B, sample k % B).
    s = student_region_logits.permute(2, 0, 1).reshape(n * b, c)
    t = teacher_region_logits.detach().permute(2, 0, 1).reshape(n * b, c)
    y = target.repeat(n)
    tckd, nckd = dkd_parts(s, t, y, temperature)
    r = n * b
    with torch.no_grad():
        pred = teacher_region_logits.detach().argmax(1)            # [B, N]
        correct = pred == target[:, None]
        idx = torch.where(correct == correct[:, :1], 1.0, complementary_weight).to(s.dtype)
        idx[:, 0] = 1.0
        idx_rows = idx.T.reshape(-1)
        if confidence is None:
            w_tc = w_nc = torch.ones(r, dtype=s.dtype, device=s.device)
        else:
            u = confidence.detach().to(s.dtype)
            u_rows = u.reshape(-1) if official_uc_order else u.T.reshape(-1)
            w_tc, w_nc = 2.0 + u_rows, 1.0 - u_rows
    return (idx_rows * ((alpha * tckd / r + eps) * w_tc + (beta * nckd / r + eps) * w_nc)).sum()


# --- ScaleKD (docs/specs/scalekd.md §2) --------------------------------------------------------------------

def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> Tensor:
    """The unnormalised DCT-II matrix of the official code, ``D[k, i] = 2·cos(πk(2i+1)/(2n))``, ``[n, n]``."""
    k = torch.arange(n, dtype=dtype, device=device)[:, None]
    i = torch.arange(n, dtype=dtype, device=device)[None, :]
    return 2 * torch.cos(torch.pi * k * (2 * i + 1) / (2 * n))


def dct2(x: Tensor) -> Tensor:
    """2-D DCT-II over the last two axes, ``X = D_H x D_Wᵀ`` (non-square maps allowed), ``[..., H, W]``.
    A cross-check of :func:`dct_remove_dc`; the loss itself does not need the transform."""
    dh = dct_matrix(x.shape[-2], x.dtype, x.device)
    dw = dct_matrix(x.shape[-1], x.dtype, x.device)
    return dh @ x @ dw.T


def idct2(coeffs: Tensor) -> Tensor:
    """The exact inverse of :func:`dct2`: ``x = D_H⁻¹ X D_W⁻ᵀ``."""
    dh = torch.linalg.inv(dct_matrix(coeffs.shape[-2], coeffs.dtype, coeffs.device))
    dw = torch.linalg.inv(dct_matrix(coeffs.shape[-1], coeffs.dtype, coeffs.device))
    return dh @ coeffs @ dw.T


def dct_remove_dc(x: Tensor) -> Tensor:
    """ScaleKD's frequency view, ``[B, C, H, W] → [B, C, H, W]``: the map with its 2-D DCT-II DC
    coefficient zeroed. That equals subtracting each channel's spatial mean (docs/specs/scalekd.md §2.2),
    which is what is computed: exact, for any H and W (the official DCT assumes H = W)."""
    if x.ndim != 4:
        raise ValueError(f"dct_remove_dc expects a [B, C, H, W] map, got shape {tuple(x.shape)}")
    return x - x.mean(dim=(-2, -1), keepdim=True)


def dfm_loss(student_map: Tensor, teacher_map: Tensor, view: str = "spatial") -> Tensor:
    """Dual-view feature mimicking (ScaleKD §2.2), no weight inside:
    ``(1/B)·Σ_{b,c,h,w} (n(S) − n(T))²`` with ``n`` the L2 normalisation over channels at each
    position; ``view="frequency"`` removes the DC component (:func:`dct_remove_dc`) from both maps
    first. Maps ``[B, C, H, W]`` of equal shape; the teacher map is not differentiated."""
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"dfm_loss: student map {tuple(student_map.shape)} and teacher map "
                         f"{tuple(teacher_map.shape)} differ")
    if view not in ("spatial", "frequency"):
        raise ValueError(f"dfm_loss: view must be 'spatial' or 'frequency', got {view!r}")
    s, t = student_map, teacher_map.detach()
    if view == "frequency":
        s, t = dct_remove_dc(s), dct_remove_dc(t)
    diff = F.normalize(s, dim=1) - F.normalize(t, dim=1)
    return diff.pow(2).sum() / s.shape[0]


def soft_target_ce(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """ScaleKD's logit term before its weight (§2.4): ``−τ²·mean_b Σ_c p_T log p_S``, the soft-target
    cross-entropy (KL plus the teacher's entropy, so the same gradient as τ²·KL). ``log_softmax``
    instead of the official ``log(softmax)``: a probability that underflows gives no 0·(−∞) NaN."""
    p_t = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    return -temperature ** 2 * (p_t * log_p_s).sum(-1).mean()
