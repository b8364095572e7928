"""ScaleKD (Fan et al., NeurIPS 2024; specification: ``docs/specs/scalekd.md``) as one loss term.

Three parts, all trained with the student and dropped after training:

* a cross-attention projector per site (the student's last two stages) and view: learned or
  chained queries on the teacher's grid attend over the student's map (:class:`CrossAttentionProjector`);
* dual-view feature mimicking against the teacher's final map ``T4``: the spatial view and the
  DC-removed "frequency" view (:func:`medistill.losses.dfm_loss`);
* teacher parameter perception: the stage-3 projector outputs run through the frozen teacher's
  last stage (:class:`TeacherLastStage`; gradients flow through it, its weights stay fixed) and
  become the stage-4 queries.

The logit part of the method (soft-target CE at τ = 1, weight 0.5, task loss halved) is the
``soft_ce`` term; the ``scalekd`` preset in :mod:`medistill.distill.methods` combines them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medistill.distill.context import StepContext
from medistill.distill.terms.base import LossTerm, Params, TermSetup, register
from medistill.errors import ConfigError, ModelError
from medistill.losses import functional as L

Tensor = torch.Tensor


def tokens_to_map(tokens: Tensor, hw: tuple[int, int]) -> Tensor:
    """``[B, H·W, C]`` row-major tokens → ``[B, C, H, W]``."""
    b, n, c = tokens.shape
    if n != hw[0] * hw[1]:
        raise ModelError(f"{n} tokens do not fill a {hw[0]}×{hw[1]} grid")
    return tokens.transpose(1, 2).reshape(b, c, hw[0], hw[1])


def map_to_tokens(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` → ``[B, H·W, C]`` (token index ``h·W + w``)."""
    return x.flatten(2).transpose(1, 2)


class CrossAttentionProjector(nn.Module):
    """ScaleKD's projector (docs/specs/scalekd.md §2.1): ``[B, Cs, Hs, Ws]`` student map (+ optional query
    tokens ``[B, Hq·Wq, Ct]``) → ``[B, Hq·Wq, Ct]`` tokens in the teacher's space.

    Keys/values: the student map after a 3×3 conv, BN, ReLU and a learned position embedding.
    Queries: the given tokens, else a learned embedding of the query grid; both through a 1×1
    conv and ReLU. Multi-head attention with logits scaled by ``d^-0.5 · softmax_scale`` and no
    residual (query and key spaces differ), then LayerNorm and a residual FFN (Ct → 4Ct → Ct).
    Parameters are registered in the order of the spec's test vectors; initialisation follows
    the official code (PyTorch defaults; position embedding trunc-normal 0.02; queries N(0, 1)).
    """

    def __init__(self, student_channels: int, target_channels: int, student_hw: tuple[int, int],
                 query_hw: tuple[int, int], heads: int, softmax_scale: float = 5.0, self_query: bool = True):
        super().__init__()
        if target_channels % heads:
            raise ConfigError(f"projector: {target_channels} teacher channels do not split into {heads} heads")
        cs, ct = student_channels, target_channels
        self.student_hw, self.query_hw = tuple(student_hw), tuple(query_hw)
        self.heads, self.softmax_scale = heads, softmax_scale
        self.proj_student = nn.Sequential(nn.Conv2d(cs, cs, 3, 1, 1), nn.BatchNorm2d(cs), nn.ReLU())
        self.pos_embed = nn.Parameter(torch.zeros(1, cs, *self.student_hw))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # Learned queries only where no chained query comes in (the official s4 queries were unused).
        self.query = nn.Embedding(self.query_hw[0] * self.query_hw[1], ct) if self_query else None
        self.proj_pos = nn.Sequential(nn.Conv2d(ct, ct, 1), nn.ReLU())
        self.q, self.k, self.v, self.proj = nn.Linear(ct, ct), nn.Linear(cs, ct), nn.Linear(cs, ct), nn.Linear(ct, ct)
        self.norm = nn.LayerNorm(ct)
        self.fc1, self.fc2 = nn.Linear(ct, 4 * ct), nn.Linear(4 * ct, ct)

    def forward(self, x: Tensor, query: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        if tuple(x.shape[-2:]) != self.student_hw:
            raise ModelError(f"projector built for a {self.student_hw} student map got {tuple(x.shape[-2:])}")
        keys = map_to_tokens(self.proj_student(x) + self.pos_embed)                    # [B, Ls, Cs]
        if query is not None:
            q0 = tokens_to_map(query, self.query_hw)
        elif self.query is not None:
            q0 = self.query.weight.reshape(1, *self.query_hw, -1).permute(0, 3, 1, 2).expand(b, -1, -1, -1)
        else:
            raise ModelError("projector without learned queries needs a query")
        queries = map_to_tokens(self.proj_pos(q0))                                      # [B, Lq, Ct]

        def heads(t: Tensor) -> Tensor:                                                 # [B, h, L, d]
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = heads(self.q(queries)), heads(self.k(keys)), heads(self.v(keys))
        d = q.shape[-1]
        o = F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5 * self.softmax_scale)
        o = self.proj(o.transpose(1, 2).reshape(b, -1, self.heads * d))
        o = self.norm(o)
        return o + self.fc2(F.relu(self.fc1(o)))


@dataclass
class StageSpec:
    """Where a teacher splits into "up to stage 3" and its last stage ``G_T``.

    ``s3_tap``: the module whose output is ``G_T``'s input; ``modules``: run in order as ``G_T``
    (the last one's output is ``T4``); ``layout``: ``nchw`` (CNNs), ``nhwc`` (timm Swin) or
    ``tokens`` (ViT/DeiT, whose first ``prefix_tokens`` tokens are class/distillation tokens);
    ``s4_modules``: plain-ViT teachers only — the blocks the stage-4 projector outputs also pass
    through (spec §2.3)."""

    s3_tap: str
    modules: list[str]
    layout: str
    prefix_tokens: int = 0
    s4_modules: tuple[str, ...] = ()


def teacher_stage_spec(model: nn.Module, vit_entry_block: int | None = None) -> StageSpec:
    """The last-stage split of a timm Swin, ViT/DeiT, ResNet or ``stages`` network (ConvNeXt,
    RegNet, …); any other teacher is refused with what to configure instead."""
    names = {n for n, _ in model.named_modules()}
    if isinstance(getattr(model, "layers", None), nn.Sequential | nn.ModuleList) and "Swin" in type(model).__name__:
        n = len(model.layers)
        return StageSpec(f"layers.{n - 2}", [f"layers.{n - 1}", "norm"], "nhwc")
    if isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList) and hasattr(model, "num_prefix_tokens"):
        n = len(model.blocks)
        entry = vit_entry_block if vit_entry_block is not None else n - max(1, n // 4)
        if not 1 <= entry < n:
            raise ConfigError(f"vit_entry_block must lie in [1, {n - 1}] for a {n}-block ViT, got {entry}")
        return StageSpec(f"blocks.{entry - 1}", [f"blocks.{i}" for i in range(entry, n)] + ["norm"], "tokens",
                         int(model.num_prefix_tokens), (f"blocks.{n - 1}", "norm"))
    if {"layer3", "layer4"} <= names:
        return StageSpec("layer3", ["layer4"], "nchw")
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Sequential | nn.ModuleList) and len(stages) >= 2:
        mods = [f"stages.{len(stages) - 1}"] + (["norm_pre"] if "norm_pre" in names else [])
        return StageSpec(f"stages.{len(stages) - 2}", mods, "nchw")
    raise ModelError(f"ScaleKD cannot find the last stage of a {type(model).__name__} teacher: it needs the module "
                     "whose output enters the last stage and the module(s) of that stage. Set the scalekd term's "
                     "teacher_s3_tap, teacher_stage and teacher_layout (see `medistill models taps`)")


def _is_spatial(name: str, module: nn.Module) -> bool:
    kind = type(module).__name__.lower()
    return not any(w in name.split(".")[-1].lower() for w in ("pool", "head", "flatten", "drop")) and "pool" not in kind


def student_stage_taps(model: nn.Module, probe: Callable[[list[str]], dict[str, tuple[int, ...]]]) -> tuple[str, str]:
    """The student's last two stages ``(S3, S4)``: the last 4-D map before pooling, and the last
    one at a larger resolution. Stage containers (``stages``, ``layers``, ``blocks``, ``features``)
    are searched child by child; ResNets use ``layer3``/``layer4``."""
    names = {n for n, _ in model.named_modules()}
    if {"layer3", "layer4"} <= names:
        return "layer3", "layer4"
    cands: list[str] = []
    for box in ("stages", "layers", "blocks", "features"):
        c = getattr(model, box, None)
        if isinstance(c, nn.Sequential | nn.ModuleList):
            cands = [f"{box}.{n}" for n, m in c.named_children()]
            break
    if not cands:
        cands = [n for n, m in model.named_children() if _is_spatial(n, m)]
    shapes = probe(cands)
    maps = [n for n in cands if n in shapes and len(shapes[n]) == 4]
    if not maps:
        raise ModelError(f"ScaleKD found no 4-D stage outputs on the student {type(model).__name__}; set student_taps")
    s4 = maps[-1]
    larger = [n for n in maps if shapes[n][-2:] != shapes[s4][-2:]]
    s3 = larger[-1] if larger else (maps[-2] if len(maps) > 1 else None)
    if s3 is None:
        raise ModelError(f"ScaleKD needs two stages on the student; found only {s4}; set student_taps")
    return s3, s4


class TeacherLastStage:
    """Runs the frozen teacher's last stage on projector tokens (TPP). Held outside the term's
    module tree so its weights are neither optimised nor saved with the term."""

    def __init__(self, model: nn.Module, spec: StageSpec):
        mods = dict(model.named_modules())
        missing = [m for m in [*spec.modules, *spec.s4_modules] if m not in mods]
        if missing:
            raise ModelError(f"teacher {type(model).__name__} has no module(s) {missing}")
        self.spec = spec
        self.stage = [mods[m] for m in spec.modules]
        self.s4 = [mods[m] for m in spec.s4_modules]

    @staticmethod
    def _run(modules: list[nn.Module], x: Tensor) -> Tensor:
        for m in modules:
            x = m(x)
        return x

    def to_input(self, tokens: Tensor, hw: tuple[int, int]) -> Tensor:
        """Projector tokens ``[B, H·W, C]`` → the layout the stage takes."""
        if self.spec.layout == "nchw":
            return tokens_to_map(tokens, hw)
        if self.spec.layout == "nhwc":
            return tokens.reshape(tokens.shape[0], hw[0], hw[1], tokens.shape[2])
        return tokens

    def to_map(self, out: Tensor, hw: tuple[int, int], prefixed: bool = False) -> Tensor:
        """A stage output (or, ``prefixed``, the teacher's own ``T4`` tap, which carries a ViT's
        class tokens) in the teacher's layout → ``[B, C, H, W]``."""
        if self.spec.layout == "nchw":
            return out
        if self.spec.layout == "nhwc":
            return out.permute(0, 3, 1, 2)
        return tokens_to_map(out[:, self.spec.prefix_tokens:] if prefixed else out, hw)

    def __call__(self, tokens: Tensor, hw: tuple[int, int]) -> Tensor:
        return self._run(self.stage, self.to_input(tokens, hw))

    def s4_pass(self, tokens: Tensor) -> Tensor:
        return self._run(self.s4, tokens) if self.s4 else tokens

    def set_train(self, mode: bool) -> None:
        for m in self.stage + self.s4:
            m.train(mode)


def _grid(shape: tuple[int, ...], layout: str, prefix: int = 0) -> tuple[int, int, int]:
    """(channels, H, W) of a tap in a layout (batch dim included in ``shape``)."""
    if layout == "nchw":
        return shape[1], shape[2], shape[3]
    if layout == "nhwc":
        return shape[3], shape[1], shape[2]
    n = shape[1] - prefix
    side = math.isqrt(n)
    if side * side != n:
        raise ModelError(f"{n} ViT patch tokens do not form a square grid")
    return shape[2], side, side


@register("scalekd")
class ScaleKDTerm(LossTerm):
    """ScaleKD's feature part: ``α3·(L_sp, L_fr)`` at the student's stage 3 through TPP and
    ``α4·(L_sp, L_fr)`` at stage 4 with the chained queries, all against the teacher's ``T4``
    (docs/specs/scalekd.md §2.2–2.3). Returns the sum and logs each of the four losses."""

    class P(Params):
        teacher: str | None = None
        student_taps: tuple[str, str] | None = Field(None, description="(S3, S4); default: the student's last two stages")
        teacher_s3_tap: str | None = None
        teacher_stage: list[str] | None = None
        teacher_layout: str | None = Field(None, pattern="^(nchw|nhwc|tokens)$")
        vit_entry_block: int | None = None
        alpha3: tuple[float, float] = (0.08, 0.06)
        alpha4: tuple[float, float] = (0.08, 0.06)
        heads3: int | None = Field(None, ge=1, description="default: teacher s3 channels / 64, at least 1")
        heads4: int | None = Field(None, ge=1)
        softmax_scale: float | tuple[float, float] = 5.0
        rescale_49: bool = Field(False, description="α·49/(H4·W4): the official per-position strength on other grids")
        teacher_train_mode: bool = Field(False, description="the official code's train-mode teacher (drop-path) in TPP")

    def uses_labels(self) -> bool:
        return False

    def __init__(self, student: str, params: Params, setup: TermSetup):
        super().__init__(student, params, setup)
        self.teacher = self._teachers([self.p.teacher] if self.p.teacher else None)[0]
        if setup.probe is None:
            raise ConfigError("scalekd needs TermSetup.probe to measure the teacher's stage-3 grid")
        model = setup.models[self.teacher]
        if self.p.teacher_s3_tap or self.p.teacher_stage:
            if not (self.p.teacher_s3_tap and self.p.teacher_stage and self.p.teacher_layout):
                raise ConfigError("scalekd: teacher_s3_tap, teacher_stage and teacher_layout go together")
            prefix = int(getattr(model, "num_prefix_tokens", 0)) if self.p.teacher_layout == "tokens" else 0
            spec = StageSpec(self.p.teacher_s3_tap, list(self.p.teacher_stage), self.p.teacher_layout, prefix)
        else:
            spec = teacher_stage_spec(model, self.p.vit_entry_block)
        # object.__setattr__: not a submodule (see TeacherLastStage)
        object.__setattr__(self, "stage", TeacherLastStage(model, spec))
        if self.p.teacher_train_mode and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                             for s in self.stage.stage for m in s.modules()):
            raise ConfigError("scalekd: teacher_train_mode would let BatchNorm in the teacher's last stage use batch "
                              "statistics and overwrite its running statistics; it is meant for transformer teachers")
        self.s_taps = self.p.student_taps or student_stage_taps(setup.models[student], lambda n: setup.probe(student, n))

    def taps(self) -> dict[str, set[str]]:
        return {self.student: set(self.s_taps), self.teacher: {self.stage.spec.modules[-1]}}

    def build(self, setup: TermSetup) -> None:
        spec = self.stage.spec
        t3 = setup.probe(self.teacher, [spec.s3_tap])[spec.s3_tap]
        t4 = setup.tap_shapes[self.teacher][spec.modules[-1]]
        c3, h3, w3 = _grid(t3, spec.layout, spec.prefix_tokens)
        c4, h4, w4 = _grid(t4, spec.layout, spec.prefix_tokens)
        self.grid3, self.grid4 = (h3, w3), (h4, w4)
        if h4 * w4 == 1 and (self.p.alpha3[1] or self.p.alpha4[1]):
            raise ModelError(f"teacher {self.teacher!r} ends in a 1×1 map here, where the frequency view is identically "
                             "zero: run the teacher at a larger input (teachers.N.input_size) or set alpha3/alpha4's "
                             "second (frequency) weight to 0")
        shapes = setup.tap_shapes[self.student]
        (_, cs3, *hw3), (_, cs4, *hw4) = (shapes[t] for t in self.s_taps)
        if len(hw3) != 2 or len(hw4) != 2:
            raise ModelError(f"scalekd: student taps {self.s_taps} must be [B, C, H, W] maps; got {shapes[self.s_taps[0]]}, "
                             f"{shapes[self.s_taps[1]]}")
        sc = self.p.softmax_scale if isinstance(self.p.softmax_scale, tuple) else (self.p.softmax_scale,) * 2
        h3n = self.p.heads3 or max(1, c3 // 64)
        h4n = self.p.heads4 or max(1, c4 // 64)

        def proj(cs: int, ct: int, shw: list[int], qhw: tuple[int, int], h: int, s: float, sq: bool) -> CrossAttentionProjector:
            return CrossAttentionProjector(cs, ct, tuple(shw), qhw, h, s, self_query=sq)

        # One projector per site and view: spatial ("sp") and frequency ("fr").
        self.p3 = nn.ModuleDict({v: proj(cs3, c3, hw3, self.grid3, h3n, sc[i], True) for i, v in enumerate(("sp", "fr"))})
        self.p4 = nn.ModuleDict({v: proj(cs4, c4, hw4, self.grid4, h4n, sc[i], False) for i, v in enumerate(("sp", "fr"))})
        self.scale = 49.0 / (h4 * w4) if self.p.rescale_49 else 1.0

    def forward(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        s3, s4 = (ctx.feats[self.student][t] for t in self.s_taps)
        t4 = self.stage.to_map(ctx.feats[self.teacher][self.stage.spec.modules[-1]].detach().float(), self.grid4,
                               prefixed=True)
        if self.p.teacher_train_mode:
            self.stage.set_train(True)
        try:
            losses = scalekd_losses(s3, s4, t4, self.p3, self.p4, self.stage, self.grid3, self.grid4,
                                    tuple(a * self.scale for a in self.p.alpha3), tuple(a * self.scale for a in self.p.alpha4))
        finally:
            if self.p.teacher_train_mode:
                self.stage.set_train(False)
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}


def scalekd_losses(s3: Tensor, s4: Tensor, t4: Tensor, p3: nn.ModuleDict, p4: nn.ModuleDict, stage: TeacherLastStage,
                   grid3: tuple[int, int], grid4: tuple[int, int], alpha3: tuple[float, float],
                   alpha4: tuple[float, float]) -> dict[str, Tensor]:
    """The four weighted feature losses of one step (docs/specs/scalekd.md §4 steps 3–4).

    ``s3``/``s4``: student maps ``[B, C, H, W]``; ``t4``: the teacher's final map ``[B, C4, H4, W4]``;
    ``p3``/``p4``: projectors by view (``sp``, ``fr``); ``grid3``/``grid4``: the teacher's stage-3
    and stage-4 grids. Returns ``{s3, s3_alt, s4, s4_alt}``."""
    losses: dict[str, Tensor] = {}
    for i, (view, name, suffix) in enumerate((("sp", "spatial", ""), ("fr", "frequency", "_alt"))):
        z3 = stage.to_map(stage(p3[view](s3), grid3), grid4)                 # TPP: [B, C4, H4, W4]
        y4 = p4[view](s4, query=map_to_tokens(z3))                            # queries chained, not detached
        y4_map = stage.to_map(stage.s4_pass(y4), grid4) if stage.s4 else tokens_to_map(y4, grid4)
        losses[f"s3{suffix}"] = alpha3[i] * L.dfm_loss(z3.float(), t4, name)
        losses[f"s4{suffix}"] = alpha4[i] * L.dfm_loss(y4_map.float(), t4, name)
    return losses
