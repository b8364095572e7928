"""Tensor transforms for small medical images.

Images are kept at their native size (28–64 px are not blown up to 224) unless a participant
asks for another size; each model then resizes and normalises the shared batch for itself
(see :class:`medistill.models.factory.Preprocess`). Augmentation is either a *finite view set*
(``none``, ``flip``: 2 views, ``dihedral``: 8 flips/90° rotations — natural for fundus and
histology, and cacheable because every view can be enumerated) or ``standard`` random crops
and flips (not cacheable: the teacher must see each random view).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

NUM_VIEWS = {"none": 1, "flip": 2, "dihedral": 8, "standard": 0}


def apply_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``v`` of the dihedral group on ``[..., H, W]``: rotate by ``v % 4`` quarter turns,
    then flip horizontally when ``v >= 4``. View 0 is the identity."""
    k = view % 4
    if k:
        x = torch.rot90(x, k, dims=(-2, -1))
    if view >= 4:
        x = x.flip(-1)
    return x


def views_for(augment: str) -> list[int]:
    """The view ids of a finite view set, ``[0]`` for ``none``, ``[]`` for random augmentation."""
    if augment == "flip":
        return [0, 4]
    return list(range(NUM_VIEWS[augment]))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of ``[C, H, W]`` or ``[B, C, H, W]`` to ``size × size``."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    squeeze = x.dim() == 3
    y = F.interpolate(x[None] if squeeze else x, size=(size, size), mode="bilinear",
                      align_corners=False, antialias=True)
    return y[0] if squeeze else y


class Augment:
    """Training augmentation on a float ``[C, H, W]`` tensor in [0, 1]; returns ``(x, view)``
    where ``view`` is the view id (−1 for random augmentation)."""

    def __init__(self, kind: str, size: int):
        self.kind = kind
        self.views = views_for(kind)
        self.random = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(),
        ]) if kind == "standard" else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.random is not None:
            return self.random(x), -1
        v = self.views[int(torch.randint(len(self.views), ()))] if len(self.views) > 1 else 0
        return apply_view(x, v), v

    @property
    def cacheable(self) -> bool:
        return self.random is None
