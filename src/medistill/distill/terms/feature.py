"""Terms on features: FitNet (with its regressor), attention transfer, ND."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from medistill.distill.context import StepContext
from medistill.errors import ModelError
from medistill.losses import functional as L

from medistill.distill.terms.base import CLASS_MEANS, LossTerm, Params, TermSetup, register

Tensor = torch.Tensor


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

    def uses_labels(self) -> bool:
        return False

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

    def uses_labels(self) -> bool:
        return False

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
        self.register_buffer("class_means", setup.facts[(CLASS_MEANS, self.teacher, self.p.teacher_tap)])

    def needs(self) -> set[tuple[str, ...]]:
        return {(CLASS_MEANS, self.teacher, self.p.teacher_tap)}

    def forward(self, ctx: StepContext) -> Tensor:
        s = self.projector(ctx.feats[self.student][self.p.student_tap])
        return L.nd_loss(s, ctx.feats[self.teacher][self.p.teacher_tap], self.class_means, ctx.target)


