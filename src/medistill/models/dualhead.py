"""DHO dual-head student (docs/specs/methods.md E.3): a shared backbone with a CE head (the model's own
classifier) and a KD head. Training mode returns the CE-head logits and runs the KD head as the
module ``head_kd`` (tap it: ``student_logits_tap: head_kd``). Eval mode returns
``log(a·softmax(z_ce) + (1 − a)·softmax(z_kd / b))`` — log-probabilities, so softmax of the
output is DHO's combined prediction; ``a`` and ``b`` are buffers tuned on validation data.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from medistill.losses.functional import dho_combine
from medistill.models.modes import eval_mode

A_GRID = [round(0.05 * i, 2) for i in range(21)]
B_GRID = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0]


class DualHead(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        if not all(hasattr(backbone, f) for f in ("forward_features", "forward_head", "get_classifier")):
            raise TypeError(f"{type(backbone).__name__} lacks forward_features/forward_head/get_classifier (timm API)")
        self.backbone = backbone
        self.head_kd = nn.Linear(backbone.get_classifier().in_features, num_classes)
        self.register_buffer("a", torch.tensor(0.5))
        self.register_buffer("b", torch.tensor(1.0))

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_ce, z_kd)``, each ``[B, C]``."""
        h = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.backbone.get_classifier()(h), self.head_kd(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_ce, z_kd = self.heads(x)
        if self.training:
            return z_ce
        return torch.log(dho_combine(z_ce, z_kd, self.a, self.b).clamp_min(1e-12))

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def validation_choice(self) -> dict[str, dict[str, float]]:
        """What :meth:`tune_on_validation` chose, as reported in ``metrics.json``."""
        return {"dho_heads": {"a": float(self.a), "b": float(self.b)}}

    @torch.no_grad()
    def tune_on_validation(self, batches: list[tuple[torch.Tensor, torch.Tensor]], score) -> dict[str, float]:
        """Grid-search ``a``, ``b`` (DHO's few-shot grid) to maximise ``score(probs, labels)``
        on ``batches`` of (preprocessed images, labels) — validation data, never test."""
        zc, zk, ys = [], [], []
        with eval_mode(self):
            for x, y in batches:
                c, k = self.heads(x)
                zc.append(c)
                zk.append(k)
                ys.append(y)
        zc, zk, y = torch.cat(zc), torch.cat(zk), torch.cat(ys)
        best = (-float("inf"), 0.5, 1.0)
        for a, b in itertools.product(A_GRID, B_GRID):
            s = score(dho_combine(zc, zk, a, b), y)
            if s > best[0]:
                best = (s, a, b)
        self.a.fill_(best[1])
        self.b.fill_(best[2])
        return {"a": best[1], "b": best[2], "val_score": best[0]}
