"""Terms on logits: KD (one teacher or an aggregate), soft-target CE, hybrid, DKD, the peer term."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from pydantic import Field

from medistill.distill.context import StepContext
from medistill.errors import ConfigError
from medistill.losses import functional as L

from medistill.distill.terms.base import VAL_RECALL, LossTerm, Params, TermSetup, register
from medistill.distill.terms.supervised import _class_weights, _Weighted

Tensor = torch.Tensor


class _TeacherParams(Params):
    teachers: list[str] | None = None
    temperature: float = Field(4.0, gt=0)
    student_logits_tap: str | None = Field(None, description="read the student's logits from this tap (e.g. DHO's head_kd)")


class _TeacherTerm(LossTerm):
    """A logit term whose student logits may come from a tapped head instead of the output."""

    def taps(self) -> dict[str, set[str]]:
        return {self.student: {self.p.student_logits_tap}} if self.p.student_logits_tap else {}

    def student_logits(self, ctx: StepContext) -> Tensor:
        tap = self.p.student_logits_tap
        return ctx.feats[self.student][tap] if tap else ctx.logits[self.student]


@register("kd")
class KDTerm(_TeacherTerm):
    """Hinton KD against one teacher or an aggregate of several (F.1, F.6).

    ``aggregate``: ``logit_mean`` | ``prob_mean`` (with optional static ``teacher_weights``),
    ``entropy`` (per-sample teacher weights ``softmax_m(−H_m/κ)``), ``recall`` (per-class weights
    from each teacher's validation recall, indexed by the sample's label).
    ``sample_weight``: ``none`` | ``entropy`` (the dual-student confidence ``1 − H/log C`` of the
    aggregated teacher, at ``entropy_temperature``); ``gate_correct`` keeps the term only where
    the aggregated teacher is right; ``normalize_weights`` divides by Σw instead of B.
    ``logit_adjust`` = a > 0 matches the teacher with the student's logits shifted by a·log π
    (π: the training split's class prior), the offset logit-adjusted CE uses (Menon et al. 2021):
    the student then learns the teacher's scores *minus* the prior, so its own argmax is balanced.
    """

    class P(_TeacherParams):
        aggregate: str = Field("logit_mean", pattern="^(logit_mean|prob_mean|entropy|recall)$")
        logit_adjust: float = Field(0.0, ge=0, description="a: the student's logits + a·log(prior) inside the KL")
        teacher_weights: list[float] | None = None
        entropy_kappa: float = Field(1.0, gt=0)
        sample_weight: str = Field("none", pattern="^(none|entropy)$")
        entropy_temperature: float = Field(1.0, gt=0)
        gate_correct: bool = False
        normalize_weights: bool = False
        t2_scale: bool = Field(True, description="multiply by τ² (Hinton); False reproduces papers whose loss omits it")
        unlabeled_threshold: float = Field(0.0, ge=0, lt=1, description="on unlabelled images only: drop those whose "
                                           "aggregated teacher's top probability (τ = 1) is below this (0: keep all)")

    def uses_labels(self) -> bool:
        return self.p.aggregate == "recall" or self.p.gate_correct

    def needs(self) -> set[tuple[str, ...]]:
        return {(VAL_RECALL,)} if self.p.aggregate == "recall" else set()

    def build(self, setup: TermSetup) -> None:
        self.names = self._teachers(self.p.teachers)
        if self.p.teacher_weights is not None and len(self.p.teacher_weights) != len(self.names):
            raise ConfigError(f"kd: {len(self.p.teacher_weights)} teacher_weights for {len(self.names)} teachers")
        recall = torch.empty(0)
        if self.p.aggregate == "recall":
            recall = setup.facts[(VAL_RECALL,)][[setup.teachers.index(n) for n in self.names]]
        self.register_buffer("recall", recall, persistent=False)

    def target_probs(self, ctx: StepContext, temperature: float) -> Tensor:
        z = [ctx.logits[n].detach() for n in self.names]
        mode = self.p.aggregate
        if mode in ("logit_mean", "prob_mean"):
            return L.aggregate_teachers(z, mode, temperature, self.p.teacher_weights)
        if mode == "entropy":
            h = torch.stack([1.0 - L.entropy_confidence(t) for t in z])      # normalised entropy [M, B]
            w = torch.softmax(-h / self.p.entropy_kappa, 0)
            return L.aggregate_teachers(z, "prob_mean", temperature, w)
        w = self.recall[:, ctx.target].clamp_min(1e-3)                       # [M, B]
        return L.aggregate_teachers(z, "prob_mean", temperature, w)

    def forward(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        tau = self.p.temperature
        q = self.target_probs(ctx, tau)
        z = self.student_logits(ctx)
        if self.p.logit_adjust:
            z = L.adjust_logits(z, ctx.class_prior, self.p.logit_adjust)
        per = L.kd_per_sample(z, q, tau)
        if not self.p.t2_scale:
            per = per / tau ** 2
        w = torch.ones_like(per)
        diag: dict[str, Tensor] = {}
        if self.p.sample_weight == "entropy":
            q1 = q if self.p.entropy_temperature == tau else self.target_probs(ctx, self.p.entropy_temperature)
            w = L.entropy_confidence(q1.clamp_min(1e-30).log())
            self.record("confidence_weight", w, ctx.target)
            diag["confidence_weight"] = w.detach().mean()
        if self.p.gate_correct:
            w = w * (q.argmax(-1) == ctx.target).to(w.dtype)
        if self.p.unlabeled_threshold and ctx.labelled is not None:
            # pseudo-label confidence on the transfer set (FixMatch-style threshold); labelled rows untouched
            top = (q if tau == 1.0 else self.target_probs(ctx, 1.0)).max(-1).values
            keep = ctx.labelled | (top >= self.p.unlabeled_threshold)
            w = w * keep.to(w.dtype)
            unl = ~ctx.labelled
            diag["unlabeled_kept"] = (keep & unl).sum().float() / unl.sum().clamp_min(1).float()
        loss = (w * per).sum() / (w.sum().clamp_min(1e-12) if self.p.normalize_weights else per.numel())
        return loss, diag


@register("soft_ce")
class SoftCETerm(_TeacherTerm):
    """Soft-target cross-entropy ``−τ²·mean_b Σ_c p_T log p_S`` against the logit mean of the chosen
    teachers: ScaleKD's logit term (docs/specs/scalekd.md §2.4; τ = 1). Its value is τ²·KL plus the teacher's
    entropy, so its gradient is KD's while the logged value is larger."""

    class P(_TeacherParams):
        temperature: float = Field(1.0, gt=0)

    def build(self, setup: TermSetup) -> None:
        self.names = self._teachers(self.p.teachers)

    def uses_labels(self) -> bool:
        return False

    def forward(self, ctx: StepContext) -> Tensor:
        t = torch.stack([ctx.logits[n].detach() for n in self.names]).mean(0)
        return L.soft_target_ce(self.student_logits(ctx), t, self.p.temperature)


@register("hybrid")
class HybridTerm(LossTerm):
    """``α·CE_w(z_S, y) + (1 − α)·s_T·KL(q ‖ σ_T(z_S))`` in one term (docs/specs/methods.md C.3, D.2): α weights
    the *hard* loss; ``s_T = T²`` unless ``t2_scale`` is off; optional class weights on the CE;
    q = probability mean of the chosen teachers."""

    class P(_TeacherParams):
        alpha: float = Field(0.5, ge=0, le=1)
        t2_scale: bool = True
        class_weights: str = Field("none", pattern="^(none|balanced|class_balanced)$")
        cb_beta: float = 0.999

    def build(self, setup: TermSetup) -> None:
        self.names = self._teachers(self.p.teachers)
        w = _class_weights(_Weighted(class_weights=self.p.class_weights, cb_beta=self.p.cb_beta), setup.class_counts)
        self.register_buffer("cw", w if w is not None else torch.empty(0), persistent=False)

    def forward(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        z = ctx.logits[self.student]
        ce = F.cross_entropy(z, ctx.target, weight=self.cw if self.cw.numel() else None)
        tau = self.p.temperature
        q = L.aggregate_teachers([ctx.logits[n] for n in self.names], "prob_mean", tau)
        kd = L.kd_per_sample(z, q, tau).mean() / (1.0 if self.p.t2_scale else tau ** 2)
        return self.p.alpha * ce + (1 - self.p.alpha) * kd, {"ce": ce.detach(), "kd": kd.detach()}


@register("dkd")
class DKDTerm(_TeacherTerm):
    """Decoupled KD (F.2) against the logit mean of the chosen teachers. Use the term's
    ``warmup_epochs`` for DKD's warm-up (mdistiller: 20 epochs on CIFAR)."""

    class P(_TeacherParams):
        alpha: float = 1.0
        beta: float = 8.0

    def build(self, setup: TermSetup) -> None:
        self.names = self._teachers(self.p.teachers)

    def forward(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        t = torch.stack([ctx.logits[n].detach() for n in self.names]).mean(0)
        tckd, nckd = L.dkd_parts(self.student_logits(ctx), t, ctx.target, self.p.temperature)
        return self.p.alpha * tckd.mean() + self.p.beta * nckd.mean(), {"tckd": tckd.detach().mean(), "nckd": nckd.detach().mean()}


@register("peer")
class PeerTerm(LossTerm):
    """Mutual learning (F.5, B.2): mean over the other students of ``τ²·KL(σ_τ(sg(z_j)) ‖ σ_τ(z_i))``."""

    class P(Params):
        temperature: float = Field(1.0, gt=0)
        peers: list[str] | None = None

    def uses_labels(self) -> bool:
        return False

    def build(self, setup: TermSetup) -> None:
        self.peers = self.p.peers or [s for s in setup.students if s != self.student]
        if not self.peers:
            raise ConfigError("term 'peer' needs at least two students")

    def forward(self, ctx: StepContext) -> Tensor:
        own = ctx.logits[self.student]
        return sum(L.peer_kl(own, ctx.logits[p], self.p.temperature) for p in self.peers) / len(self.peers)


# --- feature distillation ----------------------------------------------------------------------

