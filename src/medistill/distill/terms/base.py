"""Loss terms: small modules over :class:`StepContext`, registered by name (an allow-list).

A term trains one student (``self.student``). It declares the taps it needs per participant,
may own trainable modules (projectors, regressors) that the engine hands to that student's
optimizer, and returns a scalar — optionally with diagnostics ``{name: float}`` that are
logged beside it. A method is a list of terms in the config; no term owns a training loop.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from medistill.distill.context import StepContext
from medistill.errors import ConfigError

Tensor = torch.Tensor
TERMS: dict[str, type["LossTerm"]] = {}
# What a term may need computed over a whole split before it is built (see LossTerm.needs):
VAL_RECALL = "teacher_val_recall"      # every teacher's per-class recall on validation
CLASS_MEANS = "teacher_class_means"    # a teacher tap's mean per training class


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
    # Facts over whole splits that terms declared in ``needs()``, computed once by the engine
    # before ``build``: (VAL_RECALL,) → [T, K]; (CLASS_MEANS, teacher, tap) → [K, D].
    facts: dict[tuple[str, ...], Tensor] = field(default_factory=dict)
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

    def uses_labels(self) -> bool:
        """Whether the term reads ``ctx.target``. A term that does sees only the labelled images of
        a batch (``StepContext.only``); one that does not sees every image, unlabelled ones included.
        Default: True (a term not audited for it never reads a −1 label)."""
        return True

    def needs(self) -> set[tuple[str, ...]]:
        """Facts over whole splits this term reads in ``build`` (``setup.facts``): the engine
        computes them once, so a term never calls back into the training loop. Default: none."""
        return set()

    def build(self, setup: TermSetup) -> None:
        """Create trainable modules once tap shapes (and declared facts) are known (default: none)."""

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
    if missing := sorted(term.needs() - setup.facts.keys()):
        raise ConfigError(f"term {spec_type!r} needs {missing} in TermSetup.facts")
    term.build(setup)
    return term


# --- supervised terms --------------------------------------------------------------------------

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
