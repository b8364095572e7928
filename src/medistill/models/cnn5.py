"""``cnn5``: the five-convolution transparent student of the transparency-KD paper.

Each block is ``Conv3×3 → BN → ReLU`` (tap ``conv{i}``: post-activation, pre-pool) followed by
``MaxPool2×2`` (``ceil_mode`` so that 28-px inputs survive five poolings: 28→14→7→4→2→1).
Widths are configurable; the paper does not state them (docs/specs/methods.md §D.3).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn


class CNN5(nn.Module):
    def __init__(self, num_classes: int, in_chans: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256, 256),
                 drop_rate: float = 0.0):
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"cnn5 needs five widths, got {list(widths)}")
        self.num_classes = num_classes
        prev = in_chans
        for i, w in enumerate(widths, start=1):
            setattr(self, f"conv{i}", nn.Sequential(nn.Conv2d(prev, w, 3, padding=1, bias=False),
                                                    nn.BatchNorm2d(w), nn.ReLU(inplace=False)))
            setattr(self, f"pool{i}", nn.MaxPool2d(2, ceil_mode=True))
            prev = w
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(prev, num_classes)
        self.num_features = prev

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W] → [B, widths[-1], h, w]`` (after the last pooling)."""
        for i in range(1, 6):
            x = getattr(self, f"pool{i}")(getattr(self, f"conv{i}")(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


# timm's factory passes these to every entry point; cnn5 has no pretrained configuration.
_TIMM_OPTIONS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


@register_model
def cnn5(pretrained: bool = False, num_classes: int = 1000, in_chans: int = 3,
         widths: tuple[int, ...] = (32, 64, 128, 256, 256), drop_rate: float = 0.0, **kwargs: Any) -> CNN5:
    """timm entry point: ``timm.create_model("cnn5", num_classes=…, widths=…)``. No published weights."""
    if pretrained:
        raise ValueError("cnn5 has no published weights; pass a local weights file instead")
    unknown = sorted(k for k in kwargs if k not in _TIMM_OPTIONS)
    if unknown:
        raise TypeError(f"cnn5 got unexpected keyword arguments {unknown}")
    return CNN5(num_classes, in_chans, tuple(widths), drop_rate)
