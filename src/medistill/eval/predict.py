"""Batched inference and the ``metrics.json`` / ``predictions_test.csv`` writers."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from medistill.eval.metrics import (auprc, binary_operating_point, bootstrap_ci, choose_threshold,
                                    classification_metrics, per_class_reliability)
from medistill.io import write_json, write_text
from medistill.models.modes import eval_mode, model_device


@torch.no_grad()
def predict(model: nn.Module, preprocess: nn.Module, loader: DataLoader, channels_last: bool = False,
            head: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities ``[N, C]``, labels ``[N]`` and source indices ``[N]`` over ``loader``.

    ``head``, when given, maps ``(model, x)`` to probabilities (e.g. DHO's combined heads);
    default: softmax of the logits. The model's train/eval mode is restored afterwards.
    """
    device = model_device(model)
    probs, labels, idx = [], [], []
    with eval_mode(model):
        for x, y, i, _v in loader:
            x = preprocess(x.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            p = head(model, x) if head is not None else torch.softmax(model(x).float(), -1)
            probs.append(p.float())   # kept on the device: one copy at the end, not a sync per batch
            labels.append(torch.as_tensor(y))
            idx.append(torch.as_tensor(i))
    out = (torch.cat(probs).cpu(), torch.cat(labels), torch.cat(idx))
    if getattr(loader, "medistill_sharded", False):
        from medistill.dist import gather_predictions

        out = gather_predictions(*out)
    return out


def predictions_csv(probs: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> str:
    c = probs.shape[1]
    buf = io.StringIO()
    buf.write(",".join(["index", "label", "pred", *[f"prob_{k}" for k in range(c)]]) + "\n")
    preds = probs.argmax(1)
    for i, y, p, row in zip(indices.tolist(), labels.tolist(), preds.tolist(), probs.tolist()):
        buf.write(f"{i},{y},{p}," + ",".join(f"{v:.6f}" for v in row) + "\n")
    return buf.getvalue()


def evaluate_splits(model: nn.Module, preprocess: nn.Module, loaders: dict[str, DataLoader],
                    out_dir: str | Path | None = None, model_info: dict[str, Any] | None = None,
                    class_names: list[str] | None = None, channels_last: bool = False, head: Any = None,
                    ordinal: bool = True, bootstrap: int = 1000, bootstrap_seed: int = 0,
                    target_sensitivity: float | None = None, threshold: float | None = None,
                    predictions_split: str = "test") -> dict[str, Any]:
    """Evaluate on each split; write ``metrics.json``, ``predictions_<split>.csv`` and the
    confusion matrix PNG into ``out_dir`` (atomically) when given.

    Every split gets its metrics, per-class sensitivity/specificity/ECE and (``bootstrap`` > 0)
    stratified bootstrap 95 % intervals under ``ci95``. Binary tasks also get AUPRC and their
    operating points: at the argmax and at a threshold on P(class 1), chosen on the ``val``
    split (Youden's J, or ``target_sensitivity``) unless ``threshold`` is given; the chosen one
    is returned under ``threshold``."""
    result: dict[str, Any] = {}
    test_pred = None
    chosen: dict[str, Any] | None = {"value": threshold, "rule": "given"} if threshold is not None else None
    for split, loader in loaders.items():
        probs, labels, idx = predict(model, preprocess, loader, channels_last, head)
        m = classification_metrics(probs, labels, ordinal=ordinal)
        m.update(per_class_reliability(probs, labels))
        if bootstrap:
            m["ci95"] = bootstrap_ci(probs, labels, bootstrap, bootstrap_seed)
            m["ci95"]["resamples"] = bootstrap
        if probs.shape[1] == 2:
            if chosen is None and split == "val":
                chosen = choose_threshold(probs, labels, target_sensitivity)
            m["auprc"] = auprc(probs, labels)
            m["operating_points"] = {"argmax": binary_operating_point(probs, labels)}
            if chosen is not None:
                m["operating_points"]["threshold"] = binary_operating_point(probs, labels, chosen["value"])
        result[split] = m
        if split == predictions_split:
            test_pred = (probs, labels, idx)
    if chosen is not None:
        result["threshold"] = chosen
    if model_info:
        result["model"] = model_info
    if class_names:
        result["class_names"] = class_names
    from medistill.dist import rank

    if out_dir is not None and rank() == 0:
        out = Path(out_dir)
        write_json(out / "metrics.json", result)
        if test_pred is not None:
            write_text(out / f"predictions_{predictions_split}.csv", predictions_csv(*test_pred))
            from medistill.plots import confusion_figure, save_png

            save_png(confusion_figure(result[predictions_split]["confusion_matrix"], class_names),
                     out / f"confusion_{predictions_split}.png")
    return result
