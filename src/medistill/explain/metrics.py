"""Faithfulness of saliency maps (deletion and insertion AUC, Petsiuk et al. 2018; confidence change) and agreement between maps."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medistill.models.modes import eval_mode

Tensor = torch.Tensor
_CURVE_BATCH = 128   # images per forward pass of a deletion/insertion curve


@torch.no_grad()
def _prob(model: nn.Module, x: Tensor, cls: Tensor) -> Tensor:
    return torch.softmax(model(x).float(), 1).gather(1, cls[:, None]).squeeze(1)


def _curve(model: nn.Module, images: Tensor, saliency: Tensor, class_idx: Any, steps: int, baseline: float,
           insert: bool) -> Tensor:
    with eval_mode(model), torch.no_grad():
        cls = (model(images).argmax(1) if class_idx is None
               else torch.as_tensor(class_idx, device=images.device).reshape(-1).expand(images.shape[0]))
        b, _, h, w = images.shape
        order = saliency.flatten(1).argsort(1, descending=True)        # most salient first
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(b, -1))
        rank = rank.view(b, 1, h, w)
        base = torch.full_like(images, baseline)
        # The steps' images go through the model together, ``chunk`` at a time: one forward per
        # step of a few images is mostly per-call overhead (3× slower on a CPU for 5 images).
        chunk = max(1, _CURVE_BATCH // b)
        probs = []
        for s0 in range(0, steps + 1, chunk):
            ks = torch.tensor([round(i * h * w / steps) for i in range(s0, min(steps + 1, s0 + chunk))],
                              device=rank.device)
            top = rank[None] < ks[:, None, None, None, None]           # [S, B, 1, H, W]: the k most salient
            x = torch.where(top, images, base) if insert else torch.where(top, base, images)
            probs.append(_prob(model, x.flatten(0, 1), cls.repeat(len(ks))).view(len(ks), b))
        p = torch.cat(probs).T                                         # [B, steps + 1]
    return torch.trapezoid(p, dx=1.0 / steps, dim=1)


def deletion_auc(model: nn.Module, images: Tensor, saliency: Tensor, class_idx: Any = None, steps: int = 20,
                 baseline: float = 0.0) -> Tensor:
    """Area under the class probability as the most salient pixels are replaced by ``baseline``
    (0 = the normalisation mean colour), in ``steps`` batched steps → ``[B]`` (lower = more faithful)."""
    return _curve(model, images, saliency, class_idx, steps, baseline, insert=False)


def insertion_auc(model: nn.Module, images: Tensor, saliency: Tensor, class_idx: Any = None, steps: int = 20,
                  baseline: float = 0.0) -> Tensor:
    """Area under the class probability as salient pixels are inserted into the baseline → ``[B]`` (higher = better)."""
    return _curve(model, images, saliency, class_idx, steps, baseline, insert=True)


def prediction_fidelity(model: nn.Module, images: Tensor, saliency: Tensor) -> float:
    """Fraction of images whose prediction is unchanged when the input is multiplied by its
    saliency map (docs/specs/methods.md D.6; the transparency paper's definition could not be read)."""
    with eval_mode(model), torch.no_grad():
        a = model(images).argmax(1)
        b = model(images * saliency[:, None].to(images.dtype)).argmax(1)
    return float((a == b).float().mean())


def confidence_change(model: nn.Module, images: Tensor, saliency: Tensor) -> dict[str, Tensor]:
    """Average drop ``max(0, p_c(x) − p_c(x⊙S)) / p_c(x)`` and increase ``[p_c(x⊙S) > p_c(x)]`` per image."""
    with eval_mode(model), torch.no_grad():
        logits = model(images)
        cls = logits.argmax(1)
        p0 = torch.softmax(logits.float(), 1).gather(1, cls[:, None]).squeeze(1)
        p1 = _prob(model, images * saliency[:, None].to(images.dtype), cls)
    return {"drop": (p0 - p1).clamp_min(0) / p0.clamp_min(1e-12), "increase": (p1 > p0).float()}


def map_agreement(a: Tensor, b: Tensor, top_q: float = 0.2) -> dict[str, Tensor]:
    """Per-image agreement of two maps ``[B, H, W]`` (resized to a common grid beforehand):
    IoU of the top-``q`` regions, Spearman and Pearson correlation."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    ta = fa >= fa.quantile(1 - top_q, dim=1, keepdim=True)
    tb = fb >= fb.quantile(1 - top_q, dim=1, keepdim=True)
    iou = (ta & tb).sum(1) / (ta | tb).sum(1).clamp_min(1)

    def pearson(x: Tensor, y: Tensor) -> Tensor:
        x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-12)

    def ranks(x: Tensor) -> Tensor:
        # average ranks for ties, as scipy.stats.rankdata
        r = torch.empty_like(x)
        for i in range(x.shape[0]):
            _, inv, counts = torch.unique(x[i], return_inverse=True, return_counts=True)
            ends = counts.cumsum(0).double()
            r[i] = (ends - (counts.double() - 1) / 2)[inv]
        return r

    return {"iou": iou.float(), "spearman": pearson(ranks(fa), ranks(fb)).float(), "pearson": pearson(fa, fb).float()}


def per_class(values: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """Mean per true class and the macro average over present classes."""
    per = [float(values[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]
    present = [v for v in per if v is not None]
    return {"per_class": per, "macro": sum(present) / len(present) if present else None, "pooled": float(values.mean())}
