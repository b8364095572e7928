"""A device-resident loader (``data.resident: true``): the whole image array lives on the
training device as uint8 and each batch is gathered, resized and augmented there in one batched
operation — no worker processes, no per-image Python, no host-to-device copy per step.

For in-memory sources (MedMNIST ``.npz``). With a finite view set (``none``, ``flip``,
``dihedral``) the view of each sample is drawn per step and returned, so teacher caches stay
valid; ``standard`` draws a random resized crop and flip per sample (view id −1), or one of
the image's fixed crops with a cached teacher, applied to the whole batch in one ``grid_sample``. All draws come from one CPU generator seeded per epoch. Batches have the :class:`~medistill.data.dataset.ImageDataset` item layout
``(x [B, C, S, S] float in [0, 1], labels [B], source indices [B], view ids [B])``.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from medistill.data.transforms import FixedCrops, apply_view, crop_flip_batch, random_crop_boxes, resize, unit, views_for

Tensor = torch.Tensor


def apply_views(x: Tensor, views: Tensor) -> Tensor:
    """Per-sample dihedral views of ``x [B, C, H, W]`` (``views [B]``), one batched op per view id."""
    out = x.clone()
    for v in views.unique().tolist():
        if v:
            m = views == v
            out[m] = apply_view(x[m], int(v))
    return out


class ResidentLoader:
    """Iterate one split's batches from a device-resident copy of the images."""

    def __init__(self, images: Tensor, labels: Tensor, indices: np.ndarray, size: int, batch_size: int,
                 augment: str | None, seed: int, shuffle: bool, drop_last: bool = False,
                 sample_weights: Tensor | None = None, rank: int = 0, world: int = 1, fixed: FixedCrops | None = None):
        self.images, self.labels = images, labels            # [N, C, H, W] uint8 and [N] on the device
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        self.size, self.batch_size = size, batch_size
        self.fixed = fixed if augment == "standard" else None
        self.random_crops = augment == "standard" and fixed is None
        self.views = self.fixed.views if self.fixed is not None else \
            [0] if self.random_crops or not augment else views_for(augment)
        self.gen = torch.Generator().manual_seed(seed)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.sample_weights = sample_weights
        self.rank, self.world = rank, world
        self.n = math.ceil(len(self.indices) / world)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def _order(self) -> Tensor:
        idx = self.indices
        if self.sample_weights is not None:      # the balanced sampler: with replacement
            pick = torch.multinomial(self.sample_weights, len(idx), replacement=True, generator=self.gen)
            idx = idx[pick]
        elif self.shuffle:
            idx = idx[torch.randperm(len(idx), generator=self.gen)]
        if self.world > 1:                       # pad to a multiple of the world size, then shard
            pad = self.n * self.world - len(idx)
            idx = torch.cat([idx, idx[:pad]])[self.rank::self.world]
        return idx

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        order = self._order()
        dev = self.images.device
        views = torch.as_tensor(self.views)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if len(self.views) > 1 or self.fixed is not None:
                v = views[torch.randint(len(self.views), (len(idx),), generator=self.gen)]
            else:
                v = torch.full((len(idx),), -1 if self.random_crops else 0, dtype=torch.long)
            idx_d = idx.to(dev, non_blocking=True)
            x = self.images[idx_d]
            # uint8 resizing where torch has the kernel (CPU), as the per-image pipeline does; on a
            # GPU float (within one grey level of it)
            x = unit(resize(x, self.size)) if x.device.type == "cpu" else resize(unit(x), self.size)
            if self.random_crops:
                x = crop_flip_batch(x, *random_crop_boxes(len(idx), self.gen))
            elif self.fixed is not None:
                x = self.fixed.apply(x, idx, v)
            elif len(self.views) > 1:
                x = apply_views(x, v.to(dev))
            yield x, self.labels[idx_d], idx, v
