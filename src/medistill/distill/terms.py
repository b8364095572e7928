"""Loss terms: small modules over :class:`StepContext`, registered by name (an allow-list).

A term trains one student (``self.student``). It declares the taps it needs per participant,
may own trainable modules (projectors, regressors) that the engine hands to that student's
optimizer, and returns a scalar — optionally with diagnostics ``{name: float}`` that are
logged beside it. A method is a list of terms in the config; no term owns a training loop.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from medistill.distill.context import StepContext
from medistill.errors import ConfigError, ModelError
from medistill.losses import functional as L

Tensor = torch.Tensor
TERMS: dict[str, type["LossTerm"]] = {}


def register(name: str) -> Callable[[type["LossTerm"]], type["LossTerm"]]:
    def deco(cls: type[LossTerm]) -> type[LossTerm]:
        cls.type_name = name
        TERMS[name] = cls
        return cls
    return deco


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class TermSetup:
    """What a term may know when it is built: participants, shapes of taps, data facts."""

    students: list[str]
    teachers: list[str]
    num_classes: int
    class_counts: Tensor
    tap_shapes: dict[str, dict[str, tuple[int, ...]]]   # participant → tap → shape with batch 1
    models: dict[str, nn.Module]
    teacher_val_recall: Callable[[], Tensor]            # [M, C], computed on demand
    teacher_class_means: Callable[[str, str], Tensor]   # (teacher, tap) → [C, D], computed on demand
    # (participant, taps) → shapes with batch 1 of taps no term reads every step (e.g. to size a module)
    probe: Callable[[str, list[str]], dict[str, tuple[int, ...]]] | None = None


class LossTerm(nn.Module):
    type_name: ClassVar[str] = ""
    P: ClassVar[type[Params]] = Params

    def __init__(self, student: str, params: Params, setup: TermSetup):
        super().__init__()
        self.student = student
        self.p = params
        self.teacher_names = setup.teachers
        self.stats: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)

    # Taps this term reads, per participant: {"student_name": {"layer1"}, "teacher": {...}}.
    def taps(self) -> dict[str, set[str]]:
        return {}

    def build(self, setup: TermSetup) -> None:
        """Create trainable modules once tap shapes are known (default: none)."""

    def forward(self, ctx: StepContext) -> Tensor | tuple[Tensor, dict[str, Tensor | float]]:
        """The term's value and, optionally, diagnostics (detached tensors are cheapest on a GPU:
        the engine reads them once per epoch)."""
        raise NotImplementedError

    def _teachers(self, names: list[str] | None) -> list[str]:
        chosen = names or self.teacher_names
        if not chosen:
            raise ConfigError(f"term {self.type_name!r} needs at least one teacher; none configured")
        unknown = [n for n in chosen if n not in self.teacher_names]
        if unknown:
            raise ConfigError(f"term {self.type_name!r}: unknown teacher(s) {unknown}; teachers are {self.teacher_names}")
        return chosen

    def record(self, name: str, values: Tensor, target: Tensor) -> None:
        """Accumulate a per-sample diagnostic for per-class epoch summaries."""
        # kept on the device until the epoch ends: a .cpu() per step would sync every step
        self.stats[name].append((values.detach().float(), target.detach()))

    def pop_stats(self, num_classes: int) -> dict[str, dict[str, Any]]:
        out = {}
        for name, chunks in self.stats.items():
            v = torch.cat([c[0] for c in chunks]).cpu()
            y = torch.cat([c[1] for c in chunks]).cpu()
            per = [float(v[y == k].mean()) if (y == k).any() else None for k in range(num_classes)]
            out[name] = {"mean": float(v.mean()), "per_class": per}
        self.stats.clear()
        return out


def make_term(spec_type: str, student: str, raw: dict[str, Any], setup: TermSetup) -> LossTerm:
    """Construct and build a term (tests and tools; the engine builds after measuring tap shapes)."""
    term = make_term_unbuilt(spec_type, student, raw, setup)
    term.build(setup)
    return term


# --- supervised terms --------------------------------------------------------------------------

class _Weighted(Params):
    class_weights: str = Field("none", pattern="^(none|balanced|class_balanced)$")
    cb_beta: float = 0.999


def _class_weights(p: _Weighted, counts: Tensor) -> Tensor | None:
    if p.class_weights == "balanced":
        return L.balanced_class_weights(counts)
    if p.class_weights == "class_balanced":
        return L.class_balanced_weights(counts, p.cb_beta)
    return None


@register("ce")
class CETerm(LossTerm):
    """Cross-entropy on the student's logits; optional label smoothing and class weights."""

    class P(_Weighted):
        label_smoothing: float = Field(0.0, ge=0, lt=1)

    def __init__(self, student: str, params: Params, setup: TermSetup):
        super().__init__(student, params, setup)
        w = _class_weights(self.p, setup.class_counts)
        self.register_buffer("cw", w if w is not None else torch.empty(0), persistent=False)

    def forward(self, ctx: StepContext) -> Tensor:
        def ce(target: Tensor) -> Tensor:
            return F.cross_entropy(ctx.logits[self.student], target, weight=self.cw if self.cw.numel() else None,
                                   label_smoothing=self.p.label_smoothing)

        if ctx.mix is None:
            return ce(ctx.target)
        other, lam = ctx.mix     # a mixed image is lam of its own class and 1 − lam of the other's
        return lam * ce(ctx.target) + (1.0 - lam) * ce(other)


@register("focal")
class FocalTerm(LossTerm):
    class P(_Weighted):
        gamma: float = 2.0

    def __init__(self, student: str, params: Params, setup: TermSetup):
        super().__init__(student, params, setup)
        w = _class_weights(self.p, setup.class_counts)
        self.register_buffer("cw", w if w is not None else torch.empty(0), persistent=False)

    def forward(self, ctx: StepContext) -> Tensor:
        return L.focal_loss(ctx.logits[self.student], ctx.target, self.p.gamma, self.cw if self.cw.numel() else None)


@register("logit_adjusted")
class LogitAdjustedTerm(LossTerm):
    class P(Params):
        tau: float = 1.0

    def forward(self, ctx: StepContext) -> Tensor:
        return L.logit_adjusted_ce(ctx.logits[self.student], ctx.target, ctx.class_prior, self.p.tau)


# --- logit distillation ------------------------------------------------------------------------

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
    """

    class P(_TeacherParams):
        aggregate: str = Field("logit_mean", pattern="^(logit_mean|prob_mean|entropy|recall)$")
        teacher_weights: list[float] | None = None
        entropy_kappa: float = Field(1.0, gt=0)
        sample_weight: str = Field("none", pattern="^(none|entropy)$")
        entropy_temperature: float = Field(1.0, gt=0)
        gate_correct: bool = False
        normalize_weights: bool = False
        t2_scale: bool = Field(True, description="multiply by τ² (Hinton); False reproduces papers whose loss omits it")

    def build(self, setup: TermSetup) -> None:
        self.names = self._teachers(self.p.teachers)
        if self.p.teacher_weights is not None and len(self.p.teacher_weights) != len(self.names):
            raise ConfigError(f"kd: {len(self.p.teacher_weights)} teacher_weights for {len(self.names)} teachers")
        recall = torch.empty(0)
        if self.p.aggregate == "recall":
            all_recall = setup.teacher_val_recall()
            recall = all_recall[[setup.teachers.index(n) for n in self.names]]
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
        per = L.kd_per_sample(self.student_logits(ctx), q, tau)
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
        loss = (w * per).sum() / (w.sum().clamp_min(1e-12) if self.p.normalize_weights else per.numel())
        return loss, diag


@register("soft_ce")
class SoftCETerm(_TeacherTerm):
    """Soft-target cross-entropy ``−τ²·mean_b Σ_c p_T log p_S`` against the logit mean of the chosen
    teachers: ScaleKD's logit term (scalekd.md §2.4; τ = 1). Its value is τ²·KL plus the teacher's
    entropy, so its gradient is KD's while the logged value is larger."""

    class P(_TeacherParams):
        temperature: float = Field(1.0, gt=0)

    def build(self, setup: TermSetup) -> None:
        self.names = self._teachers(self.p.teachers)

    def forward(self, ctx: StepContext) -> Tensor:
        t = torch.stack([ctx.logits[n].detach() for n in self.names]).mean(0)
        return L.soft_target_ce(self.student_logits(ctx), t, self.p.temperature)


@register("hybrid")
class HybridTerm(LossTerm):
    """``α·CE_w(z_S, y) + (1 − α)·s_T·KL(q ‖ σ_T(z_S))`` in one term (methods.md C.3, D.2): α weights
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

    def build(self, setup: TermSetup) -> None:
        self.peers = self.p.peers or [s for s in setup.students if s != self.student]
        if not self.peers:
            raise ConfigError("term 'peer' needs at least two students")

    def forward(self, ctx: StepContext) -> Tensor:
        own = ctx.logits[self.student]
        return sum(L.peer_kl(own, ctx.logits[p], self.p.temperature) for p in self.peers) / len(self.peers)


# --- feature distillation ----------------------------------------------------------------------

def _regressor(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> nn.Module:
    """FitNet regressor (F.3): conv student→teacher channels chosen by the spatial ratio, BN, ReLU."""
    cs, hs, ws = s_shape[1:]
    ct, ht, wt = t_shape[1:]
    if hs == 2 * ht:
        conv: nn.Module = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
    elif 2 * hs == ht:
        conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
    else:
        raise ModelError(f"FitNet cannot bridge student map {s_shape[1:]} to teacher map {t_shape[1:]} "
                         "(student smaller and not half the size); choose other taps")
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU(inplace=False))


@register("fitnet")
class FitNetTerm(LossTerm):
    class P(Params):
        student_tap: str = "layer2"
        teacher_tap: str = "layer2"
        teacher: str | None = None

    def taps(self) -> dict[str, set[str]]:
        return {self.student: {self.p.student_tap}, self.teacher: {self.p.teacher_tap}}

    def __init__(self, student: str, params: Params, setup: TermSetup):
        super().__init__(student, params, setup)
        self.teacher = self._teachers([self.p.teacher] if self.p.teacher else None)[0]

    def build(self, setup: TermSetup) -> None:
        s = setup.tap_shapes[self.student][self.p.student_tap]
        t = setup.tap_shapes[self.teacher][self.p.teacher_tap]
        if len(s) != 4 or len(t) != 4:
            raise ModelError(f"FitNet needs 4-D feature maps; got {s} and {t}")
        self.regressor = _regressor(s, t)

    def forward(self, ctx: StepContext) -> Tensor:
        fs = self.regressor(ctx.feats[self.student][self.p.student_tap])
        return F.mse_loss(fs, ctx.feats[self.teacher][self.p.teacher_tap].detach())


@register("at")
class ATTerm(LossTerm):
    """Attention transfer (F.4) summed over ``pairs`` of [student_tap, teacher_tap]."""

    class P(Params):
        pairs: list[tuple[str, str]] = [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"), ("layer4", "layer4")]
        teacher: str | None = None
        p: float = 2.0

    def __init__(self, student: str, params: Params, setup: TermSetup):
        super().__init__(student, params, setup)
        self.teacher = self._teachers([self.p.teacher] if self.p.teacher else None)[0]

    def taps(self) -> dict[str, set[str]]:
        return {self.student: {a for a, _ in self.p.pairs}, self.teacher: {b for _, b in self.p.pairs}}

    def forward(self, ctx: StepContext) -> Tensor:
        fs, ft = ctx.feats[self.student], ctx.feats[self.teacher]
        return sum(L.at_loss(fs[a], ft[b], self.p.p) for a, b in self.p.pairs)


@register("nd")
class NDTerm(LossTerm):
    """ND loss (E.1) on penultimate embeddings; teacher class means are computed once over the
    training split (eval transform) and stored with the run. A BN→Dropout→Linear projector is
    added when the embedding sizes differ."""

    class P(Params):
        student_tap: str = "global_pool"
        teacher_tap: str = "global_pool"
        teacher: str | None = None

    def __init__(self, student: str, params: Params, setup: TermSetup):
        super().__init__(student, params, setup)
        self.teacher = self._teachers([self.p.teacher] if self.p.teacher else None)[0]

    def taps(self) -> dict[str, set[str]]:
        return {self.student: {self.p.student_tap}, self.teacher: {self.p.teacher_tap}}

    def build(self, setup: TermSetup) -> None:
        ds = setup.tap_shapes[self.student][self.p.student_tap]
        dt = setup.tap_shapes[self.teacher][self.p.teacher_tap]
        if len(ds) != 2 or len(dt) != 2:
            raise ModelError(f"nd needs pooled embeddings [B, D]; taps give {ds} and {dt} (use global_pool)")
        if ds[1] != dt[1]:
            lin = nn.Linear(ds[1], dt[1])
            nn.init.zeros_(lin.bias)
            self.projector: nn.Module = nn.Sequential(nn.BatchNorm1d(ds[1]), nn.Dropout(0.5), lin)
        else:
            self.projector = nn.Identity()
        self.register_buffer("class_means", setup.teacher_class_means(self.teacher, self.p.teacher_tap))

    def forward(self, ctx: StepContext) -> Tensor:
        s = self.projector(ctx.feats[self.student][self.p.student_tap])
        return L.nd_loss(s, ctx.feats[self.teacher][self.p.teacher_tap], self.class_means, ctx.target)


def make_term_unbuilt(spec_type: str, student: str, raw: dict[str, Any], setup: TermSetup) -> LossTerm:
    """Validate parameters and construct; :meth:`LossTerm.build` runs once tap shapes are known."""
    cls = TERMS.get(spec_type)
    if cls is None:
        raise ConfigError(f"unknown loss term {spec_type!r}; available: {', '.join(sorted(TERMS))}")
    try:
        params = cls.P.model_validate(raw)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {'unknown key' if x['type'] == 'extra_forbidden' else x['msg']}" for x in e.errors())
        raise ConfigError(f"term {spec_type!r}: {errs}") from None
    return cls(student, params, setup)
