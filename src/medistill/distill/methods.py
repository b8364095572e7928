"""Building a run's loss terms: the configured terms (or the supervised default of ``train``)
instantiated per student, with their taps registered and their modules built. The named
presets live in :mod:`medistill.presets` (re-exported here)."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from medistill.config import RunConfig, TermSpec
from medistill.distill.terms import TERMS, LossTerm, TermSetup, make_term_unbuilt
from medistill.errors import ConfigError
from medistill.models.ensemble import EnsembleModel
from medistill.presets import METHODS, Terms, method_terms  # noqa: F401  (re-exported)


def build_terms(specs: list[TermSpec], setup: TermSetup, parts: dict[str, Any],
                probe: Callable[[str, list[str]], dict[str, tuple[int, ...]]],
                provide: Callable[[tuple[str, ...]], Tensor]) -> tuple[nn.ModuleDict, dict[str, TermSpec]]:
    """Instantiate every term for its student(s) (a term without ``student`` applies to each),
    register the taps the terms read on the participants (``parts``: name → participant), measure
    the tap shapes with ``probe``, compute the facts the terms declared in ``needs()`` once each
    with ``provide`` and build the terms' own modules. Returns the terms keyed ``student__type``
    (``type2``… when repeated) and the spec behind each ``student.type`` key."""
    term_specs: dict[str, TermSpec] = {}
    terms: dict[str, LossTerm] = {}
    for spec in specs:
        if spec.type not in TERMS:
            raise ConfigError(f"unknown loss term {spec.type!r}; available: {', '.join(sorted(TERMS))}")
        for s in [spec.student] if spec.student else setup.students:
            key, n = f"{s}.{spec.type}", 2
            while key in terms:
                key, n = f"{s}.{spec.type}{n}", n + 1
            terms[key] = make_term_unbuilt(spec.type, s, spec.params(), setup)
            term_specs[key] = spec
    for term in terms.values():
        for pname, taps in term.taps().items():
            if pname not in parts:
                raise ConfigError(f"term {term.type_name!r} names unknown participant {pname!r}")
            if taps and isinstance(parts[pname].model, EnsembleModel):
                raise ConfigError(f"term {term.type_name!r} taps features of {pname!r}, a teacher ensemble; "
                                  "feature terms need a single network (name one member as the teacher)")
            parts[pname].taps |= taps
    setup.tap_shapes = {p.name: probe(p.name, sorted(p.taps)) for p in parts.values() if p.taps}
    for need in sorted(set().union(*(t.needs() for t in terms.values()))):
        if need not in setup.facts:
            setup.facts[need] = provide(need)
    for term in terms.values():
        term.build(setup)
    return nn.ModuleDict({k.replace(".", "__"): v for k, v in terms.items()}), term_specs


def supervised_terms(cfg: RunConfig) -> list[TermSpec]:
    """The default objective of ``train``: one supervised term from ``train.loss``."""
    t = cfg.train
    cw = "class_balanced" if t.loss.startswith("cb_") else t.class_weights
    if t.loss in ("ce", "cb_ce"):
        return [TermSpec(type="ce", label_smoothing=t.label_smoothing, class_weights=cw)]
    if t.loss in ("focal", "cb_focal"):
        return [TermSpec(type="focal", gamma=t.focal_gamma, class_weights=cw)]
    return [TermSpec(type="logit_adjusted")]


# Terms that stay right on mixed images: CE mixes its two labels; KD, soft-target CE and the peer
# term compare predictions on the same mixed pixels. Every other term reads the label of an image
# (class weights, DKD's target class, ND's class means, UMKD's per-class terms) or features with
# a per-class meaning, which a mixed image does not have.
MIX_SAFE = {"ce", "kd", "soft_ce", "peer"}


def check_mixing(mix: str, specs: list[TermSpec]) -> None:
    """Refuse ``train.mix`` with a term that needs one label per image."""
    if mix == "none":
        return
    bad = sorted({t.type for t in specs if t.type not in MIX_SAFE}
                 | {"kd (gate_correct / aggregate=recall)" for t in specs if t.type == "kd"
                    and (t.params().get("gate_correct") or t.params().get("aggregate") == "recall")})
    if bad:
        raise ConfigError(f"train.mix={mix} mixes two images (and their labels) in each input; the term(s) {bad} need "
                          f"one label per image. With mixing use {sorted(MIX_SAFE)}, or set train.mix=none")


def unlabeled_in_use(terms: nn.ModuleDict, data: Any, cfg: RunConfig, console: Any) -> bool:
    """Whether the unlabelled pool trains: some term must read no label (terms that read one see
    only the labelled images of each batch). Mixing would blend a label with no label: refused."""
    if not data.has_unlabeled:
        return False
    n = len(data.splits["unlabeled"])
    free = [k.replace("__", ".") for k, t in terms.items() if not t.uses_labels()]
    if not free:
        console.print(f"{n} unlabelled images are not used by this run: no loss term learns without labels (a teacher "
                      "term such as kd does); training on the labelled images only")
        return False
    if cfg.train.mix != "none" and len(free) < len(terms):
        raise ConfigError(f"train.mix={cfg.train.mix} with unlabelled images and label terms: a mixed image would carry "
                          "part of a label; use label-free terms only (e.g. --method fm) or train.mix=none")
    if cfg.data.resident == "on":
        raise ConfigError("data.resident=on does not hold unlabelled images yet; set data.resident=auto or off")
    console.print(f"unlabelled images: {n}, learnt through {', '.join(free)}; the label terms see the labelled images only")
    return True
