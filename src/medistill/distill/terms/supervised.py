"""Supervised terms: cross-entropy (also on mixed labels), focal, logit-adjusted; class weights."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from pydantic import Field

from medistill.distill.context import StepContext
from medistill.losses import functional as L

from medistill.distill.terms.base import LossTerm, Params, TermSetup, register

Tensor = torch.Tensor


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

