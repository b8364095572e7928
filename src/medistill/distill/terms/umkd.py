"""UMKD terms (docs/specs/methods.md §A): SFA, CFA and UDD, for any input size and any experts ≥ 1.

Heterogeneous experts are bridged explicitly: channels by each expert's own ``Align_t,e``
1×1 conv of the CFL block; spatial size by adaptive average pooling of the expert map to the
student's map size (the official code only supports equal sizes, e.g. R50/R18 at 224 px).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medistill.distill.context import StepContext
from medistill.distill.terms.base import LossTerm, Params, TermSetup, register
from medistill.errors import ModelError
from medistill.losses import functional as L
from medistill.models.taps import preact_tap

Tensor = torch.Tensor


class Pointwise(nn.Conv2d):
    """A bias-free 1×1 convolution computed as a matrix product over channels, ``[B, cin, H, W] →
    [B, cout, H, W]``; the same parameters and initialisation as ``nn.Conv2d(cin, cout, 1)``.
    Why not the convolution: on small maps oneDNN's bf16 1×1 convolution (forward and backward) ran
    2× slower than this GEMM on the benchmark CPU, and CFA's 2048→2048 decoder conv was the
    costliest single op of a UMKD step (benchmarks/umkd_profile.py)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.movedim(1, -1), self.weight.flatten(1)).movedim(-1, 1)


class ResBlock(nn.Module):
    """``ReLU(Conv3×3(ReLU(Conv3×3(x))) + P(x))``: no BatchNorm, no bias (CFL)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.proj = Pointwise(cin, cout) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.c2(F.relu(self.c1(x))) + self.proj(x))


class CFL(nn.Module):
    """Common-feature-learning block: per-participant 1×1 aligners, a shared extractor of three
    ResBlocks, and one decoder per expert. ``forward(F_S [B, ch_s, H, W], [F_T,e]) →
    (h_S [B, h, H, W], [h_T,e], [r_e [B, ch_te, H, W]])``."""

    def __init__(self, ch_s: int, ch_t: list[int], h: int = 128):
        super().__init__()
        self.align_s = nn.Sequential(Pointwise(ch_s, 2 * h), nn.ReLU())
        self.align_t = nn.ModuleList(nn.Sequential(Pointwise(c, 2 * h), nn.ReLU()) for c in ch_t)
        self.ext = nn.Sequential(ResBlock(2 * h, h), ResBlock(h, h), ResBlock(h, h))
        self.dec = nn.ModuleList(nn.Sequential(nn.Conv2d(h, c, 3, padding=1, bias=False), nn.ReLU(),
                                               Pointwise(c, c)) for c in ch_t)

    def forward(self, fs: Tensor, fts: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        hs = self.ext(self.align_s(fs))
        hts = [self.ext(a(f)) for a, f in zip(self.align_t, fts)]
        return hs, hts, [d(h) for d, h in zip(self.dec, hts)]


class LearnableLowPass(nn.Module):
    """Student-side learnable low-pass filter (A.3 LLF), ``[B, c, H, W] → [B, c, H, W]``."""

    def __init__(self, c: int, sizes: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.sizes = sizes
        self.pre = nn.Conv2d(c, c, 3, padding=1)
        self.strided = nn.Conv2d(c, c, 3, stride=1, padding=1)
        self.fuse = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c), nn.Hardswish())

        def dsconv() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
                                 nn.BatchNorm2d(c), nn.ReLU())
        self.ds = nn.Sequential(dsconv(), dsconv())

    def forward(self, x: Tensor) -> Tensor:
        a = L.multiscale_lowpass(self.pre(x), self.sizes)
        return self.ds(self.fuse(torch.cat([a, self.strided(x)], 1)))


class _UMKDParams(Params):
    experts: list[str] | None = None
    tap_preact: bool = False
    student_tap: str | None = None
    expert_tap: str | dict[str, str] | None = Field(None, description="one name for all experts or {expert: tap}")


def _expert_tap(p: _UMKDParams, expert: str) -> str | None:
    return p.expert_tap.get(expert) if isinstance(p.expert_tap, dict) else p.expert_tap


def _spatial(f: Tensor, size: tuple[int, int]) -> Tensor:
    return f if tuple(f.shape[-2:]) == size else F.adaptive_avg_pool2d(f, size)


class _ExpertTerm(LossTerm):
    """A term reading one stage of the student and of each expert (default taps: the stage's
    output, or its pre-activation with ``tap_preact``; explicit names override)."""

    stage = "layer4"

    def __init__(self, student: str, params: Params, setup: TermSetup):
        super().__init__(student, params, setup)
        self.experts = self._teachers(self.p.experts)
        self.s_tap = self._tap(setup, student, self.p.student_tap)
        self.e_taps = {e: self._tap(setup, e, _expert_tap(self.p, e)) for e in self.experts}

    def _tap(self, setup: TermSetup, who: str, explicit: str | None) -> str:
        if explicit:
            return explicit
        return preact_tap(setup.models[who], self.stage) if self.p.tap_preact else self.stage

    def taps(self) -> dict[str, set[str]]:
        out = {self.student: {self.s_tap}}
        for e, t in self.e_taps.items():
            out.setdefault(e, set()).add(t)
        return out


class _AlignTerm(_ExpertTerm):
    """Shared logic of SFA and CFA: CFL block, MMD² + reconstruction per expert."""

    stage = "layer1"

    class P(_UMKDParams):
        hidden: int = Field(128, ge=1)
        recon_weight: float = 1.0
        sigmas: list[float] = [0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0]

    def uses_labels(self) -> bool:
        return False

    def build(self, setup: TermSetup) -> None:
        s = setup.tap_shapes[self.student][self.s_tap]
        ts = [setup.tap_shapes[e][self.e_taps[e]] for e in self.experts]
        if len(s) != 4 or any(len(t) != 4 for t in ts):
            raise ModelError(f"{self.type_name} needs 4-D feature maps; got student {s}, experts {ts}")
        self.cfl = CFL(s[1], [t[1] for t in ts], self.p.hidden)

    def expert_target(self, f: Tensor) -> Tensor:
        return f

    def student_input(self, f: Tensor) -> Tensor:
        return f

    def pooled(self, f: Tensor) -> Tensor:
        return f

    def forward(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        fs = self.student_input(ctx.feats[self.student][self.s_tap])
        size = tuple(fs.shape[-2:])
        fts = [self.pooled(self.expert_target(_spatial(ctx.feats[e][self.e_taps[e]].detach(), size)))
               for e in self.experts]
        hs, hts, recs = self.cfl(self.pooled(fs), fts)
        mmd = sum(L.mmd2(hs, ht, self.p.sigmas) for ht in hts)
        rec = sum(F.mse_loss(r, f) for r, f in zip(recs, fts))
        return mmd + self.p.recon_weight * rec, {"mmd": mmd.detach(), "recon": rec.detach()}


@register("sfa")
class SFATerm(_AlignTerm):
    """Shallow feature alignment: msLF on expert ``layer1`` maps, LLF on the student's.

    ``pool`` (default ``auto``): both low-passed maps are average-pooled before the CFL block,
    whose 3×3 ResBlocks at full resolution cost ~75 % of a UMKD step (docs/benchmarks.md, UMKD
    profile). Why this keeps SFA's meaning: SFA aligns *low-frequency* structure, and msLF's finest
    cut-off is a 6×6 grid (at most 3 cycles a side), which 6 samples a side still represent; the
    CFL's cost falls by the factor squared (28 px maps: 4 → 7 px, 16×). ``pool: 1`` runs at full
    resolution, as the official code does (a deviation named in docs/specs/methods.md A.3)."""

    stage = "layer1"

    class P(_AlignTerm.P):
        pool: int | Literal["auto"] = Field("auto", description="average-pool factor for both maps before the CFL "
                                            "block; auto: the largest that keeps ≥ 6 px a side; 1: the official code")

    def pooled(self, f: Tensor) -> Tensor:
        k = self.factor(f)
        return f if k == 1 else F.avg_pool2d(f, k, ceil_mode=True)

    def factor(self, f: Tensor) -> int:
        # msLF's finest grid has 6 × 6 cells (≤ 3 cycles a side): 6 samples a side still carry it
        auto = max(1, min(f.shape[-2:]) // 6)
        return auto if self.p.pool == "auto" else self.p.pool

    def build(self, setup: TermSetup) -> None:
        super().build(setup)
        self.llf = LearnableLowPass(setup.tap_shapes[self.student][self.s_tap][1])

    def expert_target(self, f: Tensor) -> Tensor:
        return L.multiscale_lowpass(f)

    def student_input(self, f: Tensor) -> Tensor:
        return self.llf(f)


@register("cfa")
class CFATerm(_AlignTerm):
    """Compact feature alignment on the last convolutional stage."""

    stage = "layer4"


@register("udd")
class UDDTerm(_ExpertTerm):
    """Uncertainty-aware decoupled distillation over multi-scale region logits.

    Region logits come from each model's own classifier; expert region logits are averaged;
    the confidence ``u`` is the experts' mean evidential confidence per (sample, region)."""

    class P(_UMKDParams):
        temperature: float = Field(4.0, gt=0)
        alpha: float = 1.0
        beta: float = 8.0
        scales: list[int] = [1, 2, 4]
        spp_cascade: bool = True
        use_uncertainty: bool = True
        official_uc_order: bool = False
        complementary_weight: float = 2.0
        lambda1: float = 1.0
        lambda2: float = 0.1

    def __init__(self, student: str, params: Params, setup: TermSetup):
        super().__init__(student, params, setup)
        self.models = setup.models  # classifiers are looked up at call time; not registered as submodules

    def build(self, setup: TermSetup) -> None:
        for who, t in [(self.student, self.s_tap), *self.e_taps.items()]:
            shape = setup.tap_shapes[who][t]
            if min(shape[-2:]) < max(self.p.scales):
                raise ModelError(f"{who}'s {t} map is {shape[-2]}×{shape[-1]}, smaller than the finest region scale "
                                 f"{max(self.p.scales)}; use scales [1, 2], a larger input, or a stride-1 stem")
            if not hasattr(setup.models[who], "get_classifier"):
                raise ModelError(f"{who} has no get_classifier(); region logits need the model's own classifier")
            fc = setup.models[who].get_classifier()
            if getattr(fc, "in_features", shape[1]) != shape[1]:
                raise ModelError(f"{who}'s tap {t} has {shape[1]} channels but its classifier takes {fc.in_features}; "
                                 "region logits need the map that feeds the classifier (the last stage)")

    def _regions(self, who: str, f: Tensor) -> Tensor:
        return L.region_logits(f, self.models[who].get_classifier(), self.p.scales, self.p.spp_cascade)

    def forward(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        zs = self._regions(self.student, ctx.feats[self.student][self.s_tap])
        with torch.no_grad():
            zes = [self._regions(e, ctx.feats[e][self.e_taps[e]]) for e in self.experts]   # each [B, C, N]
            zt = torch.stack(zes).mean(0)
            u = None
            if self.p.use_uncertainty:
                u = torch.stack([L.evidential_confidence(z.transpose(1, 2), self.p.lambda1, self.p.lambda2) for z in zes]).mean(0)
        loss = L.udd_loss(zs, zt, ctx.target, self.p.temperature, self.p.alpha, self.p.beta, u,
                          self.p.complementary_weight, official_uc_order=self.p.official_uc_order)
        diag = {"confidence": u.mean()} if u is not None else {}
        if u is not None:
            self.record("confidence", u[:, 0], ctx.target)
        return loss, diag
