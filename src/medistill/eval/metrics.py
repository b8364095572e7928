"""Imbalance-aware classification metrics from stored probabilities.

torchmetrics computes the confusion matrix, macro-F1, quadratic kappa, AUROC and ECE; balanced
accuracy is taken from the confusion matrix with a NaN-mean over classes present in the
evaluation set (UMKD's mAcc; torchmetrics' macro accuracy would count an absent class as 0).
Tests check every value against scikit-learn.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (multiclass_auroc, multiclass_calibration_error,
                                                    multiclass_cohen_kappa, multiclass_confusion_matrix,
                                                    multiclass_f1_score)


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
    cm = multiclass_confusion_matrix(preds, labels, num_classes=c).double()
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
        "macro_f1": float(multiclass_f1_score(preds, labels, num_classes=c, average="none")[present].mean()),
        "qwk": float(multiclass_cohen_kappa(preds, labels, num_classes=c, weights="quadratic")) if ordinal else None,
        "auroc": _macro_auroc(probs, labels, present),
        "ece": float(multiclass_calibration_error(probs, labels, num_classes=c, n_bins=ece_bins, norm="l1")),
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
    per = multiclass_auroc(probs.float(), labels, num_classes=probs.shape[1], average="none", thresholds=None)
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
