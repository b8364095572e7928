"""A model card (``README.md``) beside each saved student: what it was trained on and how, how
well it does on the run's test split (with intervals), what it costs, and what it is not for."""

from __future__ import annotations

from typing import Any

from medistill.eval.tables import with_ci
from medistill.models.timm_config import plain_timm_note

_NAMES = {"balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "macro_f1": "macro-F1",
          "auroc": "AUROC (one-vs-rest, macro)", "qwk": "quadratic weighted kappa", "ece": "ECE (15 bins)"}


def model_card(name: str, spec: Any, metrics: dict[str, Any], cfg: Any, teachers: list[dict[str, Any]],
               source: str, fingerprint: str | None, counts: dict[str, list[int]],
               unlabeled: dict[str, Any] | None = None) -> str:
    """Markdown card of student ``name``. ``spec``: its :class:`ModelSpecRecord`; ``metrics``:
    its ``metrics.json``; ``cfg``: the run's :class:`RunConfig`; ``teachers``: rows with name,
    checkpoint, arch, input size and test balanced accuracy; ``counts``: images per class per
    split; ``unlabeled``: the unlabelled images the student learnt from (source, images, terms)."""
    t = metrics["test"]
    terms = cfg.terms or []
    recipe = " + ".join(f"{x.weight:g}·{x.type}" for x in terms if x.student in (None, name)) or f"{cfg.train.loss} (trained alone)"
    lines = [
        f"# {name}: {spec.arch} for {len(spec.class_names)}-class image classification", "",
        "Trained with medistill. Load it with `medistill.load_student(\"<this folder>\")` (preprocessing included), "
        "or predict with `medistill predict <this folder> IMAGE`.", "",
        "## Data", "",
        f"- Dataset: `{source}`" + (f" (fingerprint `{fingerprint[:16]}…`)" if fingerprint else ""),
        f"- Classes: {', '.join(spec.class_names)}",
        "- Images per class — " + "; ".join(f"{k}: {v}" for k, v in counts.items()),
        f"- Input: {spec.data_chans}-channel images in [0, 1], resized to {spec.input_size} px (bilinear), "
        f"normalised with mean {[round(v, 4) for v in spec.mean]} and std {[round(v, 4) for v in spec.std]}",
        f"- Stem: {spec.adaptation or 'as in timm (unmodified)'}"
        + (f". **Needs medistill to load:** {note}" if (note := plain_timm_note(spec)) else
           "; plain `timm.create_model` with `config.json`'s architecture and model_args rebuilds it exactly"),
        *([f"- Unlabelled images: {unlabeled['images']} from `{unlabeled['source']}`, learnt through "
           f"{unlabeled['terms']}"] if unlabeled else []), "",
        "## Training", "",
        f"- Objective: {recipe}",
        f"- {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, {cfg.optim.name} (lr {cfg.optim.lr:g}, weight decay "
        f"{cfg.optim.weight_decay:g}), {cfg.sched.name} schedule, augmentation `{cfg.data.augment}`, seed {cfg.train.seed}",
        f"- Checkpoint selected on the validation split by {cfg.train.select_metric}; the test split was not used for any choice",
    ]
    if teachers:
        lines += ["- Teachers: " + "; ".join(f"{r['name']} ({r['arch']}" + (f" at {r['input_size']} px" if r.get("input_size")
                                                                           else "") + ", test balanced accuracy "
                                            f"{r['balanced_accuracy']:.3f})" for r in teachers)]
    lines += ["", "## Test results", "", "| metric | value (95 % bootstrap interval) |", "|---|---|"]
    lines += [f"| {label} | {with_ci(t, k)} |" for k, label in _NAMES.items() if t.get(k) is not None]
    lines += ["", f"Test images: {t.get('n')}. Per-class sensitivity: "
              + ", ".join(f"{c} {v:.3f}" if v is not None else f"{c} –"
                          for c, v in zip(spec.class_names, t.get("per_class_sensitivity") or t.get("per_class_recall") or []))]
    if spec.threshold is not None:
        lines += ["", f"Operating point: P({spec.class_names[1]}) ≥ {spec.threshold:.4f} ({spec.threshold_rule}, chosen on validation)."]
    cost = metrics.get("model", {})
    lat = (metrics.get("latency") or {}).get("cpu_batch1")
    lines += ["", "## Cost", "", f"- Parameters: {cost.get('params', 0) / 1e6:.3f} M; FLOPs per image: "
              f"{cost.get('flops', 0) / 1e6:.1f} M"]
    if lat:
        lines += [f"- CPU latency, batch 1: median {lat['median_ms']:.2f} ms (IQR {lat['q1_ms']:.2f}–{lat['q3_ms']:.2f}, "
                  f"{lat['threads']} threads, on the machine that trained it)"]
    lines += ["", "## Intended use and limits", "",
              "- A research model: not a medical device, not validated for clinical decisions.",
              "- Its numbers hold for images like the test split above (same source, acquisition and preprocessing); "
              "validate it on data from each new site (`medistill evaluate RUN --data OTHER --split all`) before relying "
              "on it there.",
              "- Rare classes have few test images: read their sensitivity with the intervals, not as exact values."]
    return "\n".join(lines) + "\n"
