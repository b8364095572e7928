"""Named method presets: each is nothing but a list of loss terms (docs/specs/methods.md).

``medistill distill --method NAME`` expands the name into ``terms:``; the expansion is printed
and saved in the run's ``config.yaml``, so no default is hidden. This module imports neither
torch nor timm, so that the command line lists the presets without loading them.
"""

from __future__ import annotations

from typing import Any, Callable

Terms = list[dict[str, Any]]


def _kd(epochs: int) -> Terms:
    return [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9, "temperature": 4.0}]


def _dkd(epochs: int) -> Terms:
    # mdistiller warms DKD up over 20 of 240 epochs; keep that share for short runs.
    return [{"type": "ce", "weight": 1.0},
            {"type": "dkd", "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": float(min(20, max(1, epochs // 12)))}]


def _fitnet(epochs: int) -> Terms:
    return [{"type": "ce"}, {"type": "fitnet", "weight": 100.0, "student_tap": "layer2", "teacher_tap": "layer2"}]


def _at(epochs: int) -> Terms:
    return [{"type": "ce"}, {"type": "at", "weight": 1000.0}]


def _dml(epochs: int) -> Terms:
    return [{"type": "ce"}, {"type": "peer", "temperature": 1.0}]


def _kdpp(epochs: int) -> Terms:
    return [{"type": "ce"}, {"type": "kd", "temperature": 4.0}, {"type": "nd", "weight": 2.0}]


def _dual(epochs: int) -> Terms:
    return [{"type": "ce", "weight": 0.4},
            {"type": "kd", "weight": 0.4, "temperature": 4.0, "sample_weight": "entropy"},
            {"type": "peer", "weight": 0.2, "temperature": 4.0}]


def _mt(epochs: int) -> Terms:
    return [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9, "temperature": 4.0, "aggregate": "prob_mean"}]


def _umkd(sfa: bool = True, cfa: bool = True, udd: bool = True, uncertainty: bool = True,
          sfa_pool: int | str = "auto") -> Callable[[int], Terms]:
    """CE + α(L_SFA + L_CFA) + β·L_UDD with α = 10, β = 1 (docs/specs/methods.md A.7), and its
    ablations; ``sfa_pool=1`` is SFA at full resolution as in the official code."""
    def terms(epochs: int) -> Terms:
        t: Terms = [{"type": "ce"}]
        if sfa:
            t.append({"type": "sfa", "weight": 10.0, "pool": sfa_pool})
        if cfa:
            t.append({"type": "cfa", "weight": 10.0})
        if udd:
            t.append({"type": "udd", "weight": 1.0, "use_uncertainty": uncertainty})
        return t
    return terms


def _ce_only(epochs: int) -> Terms:
    return [{"type": "ce"}]


def _kd_ce03(epochs: int) -> Terms:
    """The dual-student paper's "traditional KD" baseline: 0.3·CE + 0.7·KD, τ = 4 (also KD-OCT's student loss)."""
    return [{"type": "ce", "weight": 0.3}, {"type": "kd", "weight": 0.7, "temperature": 4.0}]


def _uncertainty_kd(epochs: int) -> Terms:
    return [{"type": "ce", "weight": 0.4}, {"type": "kd", "weight": 0.4, "temperature": 4.0, "sample_weight": "entropy"}]


def _dho(epochs: int) -> Terms:
    """DHO: CE on the CE head, KD (τ = 2) on the KD head; students need ``kwargs: {dual_head: true}``."""
    return [{"type": "ce", "weight": 0.5},
            {"type": "kd", "weight": 0.5, "temperature": 2.0, "student_logits_tap": "head_kd"}]


def _dkdpp(epochs: int) -> Terms:
    return _dkd(epochs) + [{"type": "nd", "weight": 2.0}]


def _scalekd(epochs: int) -> Terms:
    """ScaleKD as the official configs compute it (docs/specs/scalekd.md §2.4–2.5, §3): the task loss halved,
    soft-target CE at τ = 1 with weight 0.5, and the feature terms with α3 = α4 = (0.08, 0.06)."""
    return [{"type": "ce", "weight": 0.5}, {"type": "soft_ce", "weight": 0.5, "temperature": 1.0},
            {"type": "scalekd", "alpha3": [0.08, 0.06], "alpha4": [0.08, 0.06]}]


def _fm(epochs: int) -> Terms:
    """Function matching (Beyer et al. 2022): KL to the teacher at τ = 1 on the very images the
    student sees, mixed (mixup) — no label term; see :data:`SETTINGS` and set the epochs long."""
    return [{"type": "kd", "weight": 1.0, "temperature": 1.0}]


def _kd_balanced(epochs: int) -> Terms:
    """Balanced KD for imbalanced data: 0.1·logit-adjusted CE + 0.9·τ²KL with the student's logits
    shifted by log(prior) inside the KL (τ = 4), so the student's own argmax is balanced. Its fair
    baseline is the student alone with logit-adjusted CE (:data:`SETTINGS` sets ``train.loss``)."""
    return [{"type": "logit_adjusted", "weight": 0.1},
            {"type": "kd", "weight": 0.9, "temperature": 4.0, "logit_adjust": 1.0}]


METHODS: dict[str, Callable[[int], Terms]] = {
    "kd": _kd, "dkd": _dkd, "fitnet": _fitnet, "at": _at, "dml": _dml, "kd++": _kdpp,
    "dual_student": _dual, "multi_teacher": _mt,
    "ce_only": _ce_only, "kd_ce03": _kd_ce03, "uncertainty_kd": _uncertainty_kd, "dkd++": _dkdpp, "dho": _dho,
    "scalekd": _scalekd, "fm": _fm, "kd_balanced": _kd_balanced,
    "umkd": _umkd(), "umkd_no_sfa": _umkd(sfa=False), "umkd_no_cfa": _umkd(cfa=False), "umkd_no_udd": _umkd(udd=False),
    "umkd_udd_no_uncertainty": _umkd(uncertainty=False), "umkd_sfa_full": _umkd(sfa_pool=1),
}


# One line per preset, for `distill --help` (the terms themselves are printed when a run starts).
DESCRIPTIONS: dict[str, str] = {
    "kd": "0.1·CE + 0.9·τ²KL to the teacher, τ = 4 (Hinton et al.)",
    "dkd": "CE + decoupled KD (target/non-target parts, α 1, β 8, τ 4; warm-up)",
    "fitnet": "CE + 100·MSE between projected layer2 features (FitNets hints)",
    "at": "CE + 1000·attention transfer on the feature maps",
    "dml": "deep mutual learning: students teach each other (peer KL, τ = 1)",
    "kd++": "CE + KD + 2·ND (normalised feature distance to the teacher's class means)",
    "dual_student": "dual-student KD: 0.4·CE + 0.4·entropy-weighted KD + 0.2·peer KL between the students (τ = 4)",
    "multi_teacher": "0.1·CE + 0.9·KD to the teachers' mean probabilities (τ = 4)",
    "ce_only": "cross-entropy only (a student alone, inside distill)",
    "kd_ce03": "0.3·CE + 0.7·KD, τ = 4 (the dual-student paper's traditional KD)",
    "uncertainty_kd": "0.4·CE + 0.4·KD weighted per sample by the teacher's entropy (τ = 4)",
    "dkd++": "DKD + ND",
    "dho": "dual-head optimisation: CE on one head, KD (τ = 2) on the other (kwargs dual_head: true)",
    "scalekd": "ScaleKD: 0.5·CE + 0.5·soft CE (τ = 1) + cross-attention projector feature terms (→ CNN)",
    "fm": "function matching: KL at τ = 1 on the same mixup images, no label term (long schedules)",
    "kd_balanced": "imbalance: 0.1·logit-adjusted CE + 0.9·KD with the student's logits + log prior",
    "umkd": "UMKD: CE + 10·(SFA + CFA feature alignment) + uncertainty-aware decoupled KD (UDD)",
    "umkd_no_sfa": "UMKD without SFA (ablation)",
    "umkd_no_cfa": "UMKD without CFA (ablation)",
    "umkd_no_udd": "UMKD without UDD (ablation)",
    "umkd_udd_no_uncertainty": "UMKD with UDD's uncertainty weighting off (ablation)",
    "umkd_sfa_full": "UMKD with SFA at full resolution (as in the official code)",
}


# Settings a preset needs beyond its terms (applied unless the user sets the key; printed).
SETTINGS: dict[str, dict[str, Any]] = {
    "fm": {"train.mix": "mixup", "train.mix_alpha": 1.0},
    # the supervised loss of the student-alone baseline (--baseline) is the method's own
    "kd_balanced": {"train.loss": "logit_adjusted"},
}


def method_settings(name: str) -> dict[str, Any]:
    return dict(SETTINGS.get(name, {}))


def method_terms(name: str, epochs: int) -> Terms:
    from medistill.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name](epochs)
