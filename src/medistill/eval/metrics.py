"""Imbalance-aware classification metrics from stored probabilities.

torchmetrics computes the confusion matrix, macro-F1, quadratic kappa, AUROC and ECE; balanced
accuracy is taken from the confusion matrix with a NaN-mean over classes present in the
evaluation set (UMKD's mAcc; torchmetrics' macro accuracy would count an absent class as 0).
Tests check every value against scikit-learn.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _tm() -> Any:
    """torchmetrics' classification functions, imported at the first evaluation: the import pulls
    in SciPy (≈ 2.5 s and ≈ 100 MB on a 2-core CPU) that a training run needs only when it
    first validates, so the first training step comes that much sooner (docs/benchmarks.md "scale")."""
    import torchmetrics.functional.classification as tm

    return tm


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, ece_bins: int = 15,
                           ordinal: bool = True) -> dict[str, Any]:
    """Metrics of ``probs [N, C]`` (rows sum to 1) against ``labels [N]``.

    Returns accuracy, balanced_accuracy, macro_f1, qwk, auroc (macro one-vs-rest over classes
    present with both positives and negatives; NaN if none), ece (top-label, ``ece_bins`` equal
    bins), nll, per-class recall/precision (NaN where undefined) and the confusion matrix
    (rows = true, columns = predicted). ``qwk`` is ``None`` when ``ordinal`` is false: quadratic
    kappa weighs a confusion by the distance between class ids, which means nothing for
    nominal classes (skin-lesion types, tissue types).
    """
    # Renormalise in float64: float32 softmax rows miss 1 by ~1e-7, which scikit-learn's AUROC
    # check reports as "y_prob values do not sum to one".
    probs = probs.double()
    probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-300)
    labels = labels.long()
    n, c = probs.shape
    preds = probs.argmax(1)
    cm = _tm().multiclass_confusion_matrix(preds, labels, num_classes=c).double()
    support = cm.sum(1)
    predicted = cm.sum(0)
    diag = cm.diagonal()
    recall = torch.where(support > 0, diag / support.clamp_min(1), torch.full_like(diag, math.nan))
    precision = torch.where(predicted > 0, diag / predicted.clamp_min(1), torch.full_like(diag, math.nan))
    present = support > 0
    out: dict[str, Any] = {
        "n": n,
        "accuracy": float(diag.sum() / n),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(_tm().multiclass_f1_score(preds, labels, num_classes=c, average="none")[present].mean()),
        "qwk": float(_tm().multiclass_cohen_kappa(preds, labels, num_classes=c, weights="quadratic")) if ordinal else None,
        "auroc": _macro_auroc(probs, labels, present),
        "ece": float(_tm().multiclass_calibration_error(probs, labels, num_classes=c, n_bins=ece_bins, norm="l1")),
        "nll": float(F.nll_loss(probs.clamp_min(1e-12).log(), labels)),
        "per_class_recall": [_nan_to_none(v) for v in recall.tolist()],
        "per_class_precision": [_nan_to_none(v) for v in precision.tolist()],
        "support": support.long().tolist(),
        "confusion_matrix": cm.long().tolist(),
        "ece_bins": ece_bins,
    }
    return out


def _macro_auroc(probs: torch.Tensor, labels: torch.Tensor, present: torch.Tensor) -> float | None:
    """Macro one-vs-rest AUROC over classes that have positives and negatives."""
    usable = present & (present.sum() > 1)
    if usable.sum() < 2:
        return None
    per = _tm().multiclass_auroc(probs.float(), labels, num_classes=probs.shape[1], average="none", thresholds=None)
    return float(per[usable].mean())


def _nan_to_none(v: float) -> float | None:
    return None if math.isnan(v) else v


SELECT_KEYS = {"neg_nll": "nll"}


def selection_score(metrics: dict[str, Any], key: str) -> float:
    """Higher is better; ``neg_nll`` maps to −NLL. A missing value (e.g. AUROC with one class)
    counts as −inf so it never wins."""
    v = metrics.get(SELECT_KEYS.get(key, key))
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return -math.inf
    return -v if key == "neg_nll" else float(v)


# --- clinical reporting: bootstrap intervals and operating points ----------------------------------

CI_METRICS = ("balanced_accuracy", "macro_f1", "auroc", "accuracy")


def _resample_weights(labels: np.ndarray, n_resamples: int, seed: int, stratified: bool) -> np.ndarray:
    """``[R, N]`` multiplicities of each sample in R bootstrap resamples; stratified resampling
    draws within each class, so every resample keeps the evaluation set's class counts."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    w = np.zeros((n_resamples, n))
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if stratified else [np.arange(n)]
    for idx in groups:
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_resamples)
    return w


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mann–Whitney AUROC of ``scores [N]`` for every weight row of ``w [R, N]`` at once (ties
    count one half); NaN where a resample has no positive or no negative."""
    order = np.argsort(scores, kind="mergesort")
    s, pos, w = scores[order], positive[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])                     # blocks of tied scores
    wp = np.add.reduceat(w * pos, starts, axis=1)                             # [R, U]
    wn = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn                                         # negatives strictly below
    num = (wp * (below + 0.5 * wn)).sum(1)
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def bootstrap_stats(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics of :data:`CI_METRICS` for every weight row ``w [R, N]`` of ``p [N, C]``, ``y [N]``."""
    c = p.shape[1]
    pred = p.argmax(1)
    onehot_y = np.eye(c)[y]                                                    # [N, C]
    onehot_p = np.eye(c)[pred]
    support = w @ onehot_y                                                     # [R, C]
    predicted = w @ onehot_p
    tp = w @ (onehot_y * onehot_p)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / support, np.nan)
        f1 = np.where(present, 2 * tp / (support + predicted), np.nan)
    stats = {"accuracy": tp.sum(1) / w.sum(1), "balanced_accuracy": np.nanmean(recall, 1), "macro_f1": np.nanmean(f1, 1)}
    classes = [k for k in range(c) if (y == k).any() and (y != k).any()]
    if len(classes) >= 2:
        aucs = np.stack([_weighted_auc(p[:, k], y == k, w) for k in classes], 1)
        stats["auroc"] = np.nanmean(aucs, 1)
    return stats


def bootstrap_ci(probs: torch.Tensor, labels: torch.Tensor, n_resamples: int = 1000, seed: int = 0,
                 stratified: bool = True, level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of balanced accuracy, macro-F1, AUROC and accuracy.

    Vectorised over resamples (one weight row per resample) rather than calling the metric
    functions 1,000 times: every statistic is a weighted confusion matrix or a weighted
    Mann–Whitney sum, the same definitions :func:`classification_metrics` uses (classes absent
    from the evaluation set are left out of the macro means; AUROC is one-vs-rest macro).
    Seeded: the same seed gives the same interval."""
    p = probs.double().numpy()
    y = labels.long().numpy()
    stats = bootstrap_stats(p, y, _resample_weights(y, n_resamples, seed, stratified))
    alpha = (1 - level) / 2
    out: dict[str, list[float] | None] = {}
    for k in CI_METRICS:
        v = stats.get(k)
        out[k] = None if v is None else [float(np.nanquantile(v, alpha)), float(np.nanquantile(v, 1 - alpha))]
    return out


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, target_sensitivity: float | None = None) -> dict[str, Any]:
    """A decision threshold on ``P(class 1)`` of a binary task, chosen on the split given (validation):
    Youden's J (max sensitivity + specificity − 1), or the highest threshold whose sensitivity
    reaches ``target_sensitivity``."""
    from sklearn.metrics import roc_curve

    y = labels.long().numpy()
    if probs.shape[1] != 2:
        raise ValueError("operating thresholds are defined for binary tasks")
    if len(np.unique(y)) < 2:
        return {"value": 0.5, "rule": "default (validation holds one class)"}
    fpr, tpr, thr = roc_curve(y, probs[:, 1].double().numpy())
    thr = np.minimum(thr, 1.0)       # scikit-learn's first threshold is +inf
    if target_sensitivity is not None:
        ok = np.flatnonzero(tpr >= target_sensitivity)
        i = int(ok[0])
        return {"value": float(thr[i]), "rule": f"sensitivity ≥ {target_sensitivity:g} on validation"}
    i = int(np.argmax(tpr - fpr))
    return {"value": float(thr[i]), "rule": "Youden's J on validation"}


def binary_operating_point(probs: torch.Tensor, labels: torch.Tensor, threshold: float | None = None) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV and F1 of a binary task, predicting class 1 where
    ``P(class 1) ≥ threshold`` (``None``: the argmax); undefined ratios are ``None``."""
    y = labels.long().numpy()
    p1 = probs[:, 1].double().numpy()
    pred = (p1 >= threshold) if threshold is not None else probs.argmax(1).numpy() == 1
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    tn = int((~pred & (y == 0)).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"threshold": threshold, "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def per_class_reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, list[float | None]]:
    """One-vs-rest sensitivity and specificity of the argmax prediction, and per-class ECE
    (equal-width bins of ``P(class k)`` against the indicator ``y = k``), each ``[C]``."""
    p = probs.double()
    y = labels.long()
    c = p.shape[1]
    pred = p.argmax(1)
    sens, spec, ece = [], [], []
    for k in range(c):
        pos, hit = y == k, pred == k
        sens.append(float((hit & pos).sum() / pos.sum()) if pos.any() else None)
        spec.append(float((~hit & ~pos).sum() / (~pos).sum()) if (~pos).any() else None)
        # one-vs-rest: torchmetrics' binary ECE of P(class k) against the indicator y = k
        ece.append(float(_tm().binary_calibration_error(p[:, k].float(), pos.long(), n_bins=n_bins, norm="l1")))
    return {"per_class_sensitivity": sens, "per_class_specificity": spec, "per_class_ece": ece}


def auprc(probs: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Average precision of class 1 (binary tasks; scikit-learn's step-wise definition)."""
    from sklearn.metrics import average_precision_score

    y = labels.long().numpy()
    if not (y == 1).any():
        return None
    return float(average_precision_score(y, probs[:, 1].double().numpy()))


def predicted_classes(probs: torch.Tensor | np.ndarray) -> int:
    """How many distinct classes ``probs [N, K]`` predict (argmax)."""
    return int(len(np.unique(np.asarray(probs).argmax(1)))) if len(probs) else 0


def degenerate(n_predicted: int, num_classes: int, share: float) -> bool:
    """A model that predicts one class, or fewer than ``share`` of the ``num_classes``: its
    balanced accuracy sits near chance however it was trained (``eval.degenerate_share``)."""
    return n_predicted <= 1 or n_predicted < share * num_classes


def predicted_from_confusion(cm: list[list[int]]) -> int:
    """Distinct predicted classes from a confusion matrix (rows: true, columns: predicted)."""
    return sum(1 for j in range(len(cm)) if any(row[j] for row in cm))
