"""Tensor transforms for small medical images.

Images are kept at their native size (28–64 px are not blown up to 224) unless a participant
asks for another size; each model then resizes and normalises the shared batch for itself
(see :class:`medistill.models.factory.Preprocess`). Augmentation is either a *finite view set*
(``none``, ``flip``: 2 views, ``dihedral``: 8 flips/90° rotations — natural for fundus and
histology, and cacheable because every view can be enumerated) or ``standard`` random crops
and flips: fresh ones every epoch, or, with a cached teacher, ``K`` fixed ones per image
(:class:`FixedCrops`).
"""

from __future__ import annotations

import math

import numpy as np
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


def resize(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Antialiased resize of ``[C, H, W]`` or ``[B, C, H, W]`` to ``size × size``; ``mode``
    bilinear (medistill's own models) or bicubic (what many timm checkpoints were trained with).
    uint8 images stay uint8 (CPU only: torch has no uint8 antialiased kernel on GPUs), rounded to
    whole grey levels as any 8-bit image is."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    squeeze = x.dim() == 3
    mode = "bicubic" if mode == "bicubic" else "bilinear"
    y = F.interpolate(x[None] if squeeze else x, size=(size, size), mode=mode,
                      align_corners=False, antialias=True)
    return y[0] if squeeze else y


def image_tensor(arr: np.ndarray, size: int) -> torch.Tensor:
    """An 8-bit image ``[H, W, C]`` as uint8 ``[C, size, size]``: the data pipeline's resize, done
    on uint8 with torch's uint8 antialiased kernel — 2.5× faster than on float on a CPU core,
    ≤ 1 grey level from the float resize — before augmentation, which is also cheaper on uint8;
    :func:`unit` makes the float image last. Copied: memory-mapped sources are read-only, and
    torch warns on non-writable arrays."""
    return resize(torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C")), size)


def unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float in [0, 1]; a float image is returned as it is."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def resize_matrix(n_in: int, n_out: int, mode: str = "bilinear") -> torch.Tensor:
    """``[n_out, n_in]``: :func:`resize` along one axis as a matrix (the antialiased kernels are
    separable), so ``A_h @ x @ A_w.T`` equals ``resize(x)`` for a fixed input size. ONNX has no
    antialiased resize that torch's exporter emits; two matrix products export everywhere."""
    mode = "bicubic" if mode == "bicubic" else "bilinear"
    # resizing the identity along H only (W kept) gives A_h itself: resize(I) = A_h · I · I
    return F.interpolate(torch.eye(n_in)[None, None], size=(n_out, n_in), mode=mode, align_corners=False,
                         antialias=True)[0, 0].contiguous()


# RandomResizedCrop's ranges for ``standard``: area fraction and aspect ratio of the crop.
CROP_SCALE, CROP_RATIO = (0.8, 1.0), (0.9, 1.1)


def crop_flip_batch(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop box ``k`` of image ``k`` and resize it back to the input size, flipped horizontally
    where ``flip[k]``: one ``affine_grid``/``grid_sample`` for the whole batch.

    ``x [B, C, H, W]``; ``boxes [B, 4]`` as (left, top, width, height) fractions of the image
    (continuous, so no rounding to whole pixels); ``flip [B]`` bool. Output pixel ``o`` samples the
    input at ``left·W + (o + ½)·width·W / W_out − ½`` — torchvision's crop-then-bilinear-resize
    (``align_corners=False``), except that at the crop's edge it reads the neighbouring pixel
    instead of repeating the edge one.
    """
    left, top, w, h = boxes.to(x.dtype).unbind(1)
    sign = 1.0 - 2.0 * flip.to(x.dtype)
    theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = (w * sign).to(x.device)
    theta[:, 0, 2] = (2 * left + w - 1).to(x.device)
    theta[:, 1, 1] = h.to(x.device)
    theta[:, 1, 2] = (2 * top + h - 1).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_crop_boxes(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``standard``'s random crops for ``n`` images, drawn on the CPU from ``gen`` (reproducible
    per seed): area fraction uniform in ``CROP_SCALE``, log aspect ratio uniform in
    ``log(CROP_RATIO)``, position uniform; and a coin flip each. torchvision redraws a crop that
    does not fit (up to 10 times); here the side is clipped to the image instead, which changes
    only crops of area near 1 and aspect ≠ 1 (they become slightly smaller)."""
    area = torch.empty(n).uniform_(*CROP_SCALE, generator=gen)
    logr = torch.empty(n).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=gen)
    w = (area * logr.exp()).sqrt().clamp(max=1.0)
    h = (area / logr.exp()).sqrt().clamp(max=1.0)
    left = torch.rand(n, generator=gen) * (1 - w)
    top = torch.rand(n, generator=gen) * (1 - h)
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.stack([left, top, w, h], 1), flip


# View ids of fixed random crops (``FixedCrops``) follow the eight dihedral ids.
FIXED_VIEW_BASE = 8


class FixedCrops:
    """``k`` seeded random crops (``standard``'s ranges) and flips for each of ``n`` image ids,
    drawn once: view ``FIXED_VIEW_BASE + j`` of image ``i`` is crop ``j`` of row ``i``. A student
    that draws one of them per epoch sees a finite view set, so a teacher's outputs on every view
    can be cached (``train.teacher_views``) — the trade: ``k`` crops per image instead of a new one
    each epoch. Tables are ``[n, k, 4]`` boxes and ``[n, k]`` flips, 20·n·k bytes."""

    def __init__(self, n: int, k: int, seed: int):
        boxes, flips = random_crop_boxes(n * k, torch.Generator().manual_seed(seed))
        self.k, self.boxes, self.flips = k, boxes.view(n, k, 4), flips.view(n, k)

    @property
    def views(self) -> list[int]:
        return list(range(FIXED_VIEW_BASE, FIXED_VIEW_BASE + self.k))

    def apply(self, x: torch.Tensor, idx: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Crop ``views [B]`` of images ``idx [B]`` out of ``x [B, C, H, W]`` (same size out)."""
        j = (views.cpu() - FIXED_VIEW_BASE).long()
        idx = idx.cpu().long()
        return crop_flip_batch(x, self.boxes[idx, j], self.flips[idx, j])


def view_of(x: torch.Tensor, index: int, view: int, fixed: FixedCrops | None) -> torch.Tensor:
    """View ``view`` of image ``index`` (``x [C, H, W]``): a dihedral view, or a fixed crop."""
    if view < FIXED_VIEW_BASE:
        return apply_view(x, view)
    if fixed is None:
        raise ValueError(f"view {view} is a fixed crop but no crop table is in use")
    return fixed.apply(x[None], torch.tensor([index]), torch.tensor([view]))[0]


class Augment:
    """Training augmentation on a float ``[C, H, W]`` tensor in [0, 1] of image ``index``;
    returns ``(x, view)`` where ``view`` is the view id (−1 for a fresh random crop). With
    ``fixed``, ``standard`` draws one of the image's fixed crops instead."""

    def __init__(self, kind: str, size: int, fixed: FixedCrops | None = None):
        self.kind, self.fixed = kind, fixed if kind == "standard" else None
        self.views = self.fixed.views if self.fixed is not None else views_for(kind)
        self.random = v2.Compose([
            v2.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
            v2.RandomHorizontalFlip(),
        ]) if kind == "standard" and self.fixed is None else None

    def __call__(self, x: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, int]:
        """``x``: uint8 or float ``[C, H, W]``; the result is float in [0, 1] (a random crop is
        resampled on uint8, torch's faster kernel; fixed crops sample a float image)."""
        if self.random is not None:
            return unit(self.random(x)), -1
        v = self.views[int(torch.randint(len(self.views), ()))] if len(self.views) > 1 else self.views[0]
        return view_of(unit(x), index, v, self.fixed), v


def mix_batch(x: torch.Tensor, kind: str, alpha: float, rng: "np.random.Generator") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixing augmentation of a whole batch ``[B, C, H, W]``: every image is combined with the
    image at ``perm`` (one random permutation) with weight ``lam ~ Beta(alpha, alpha)``.
    ``mixup``: ``lam·x + (1 − lam)·x[perm]``; ``cutmix``: a box of area ``≈ 1 − lam`` (centre
    uniform, clipped at the border) pasted from ``x[perm]``, with ``lam`` recomputed as the share
    of pixels kept. Returns the mixed batch, ``perm`` and ``lam``. Written here rather than with
    torchvision's ``v2.MixUp``/``CutMix`` because those mix the labels inside the transform:
    function matching needs the permutation and weight themselves (the teacher scores the very
    mixed pixels, and the supervised terms mix their two label terms)."""
    b, _, h, w = x.shape
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(b)).to(x.device)
    if kind == "mixup":
        return lam * x + (1.0 - lam) * x[perm], perm, lam
    if kind != "cutmix":
        raise ValueError(f"unknown mixing {kind!r}")
    rh, rw = int(round(h * math.sqrt(1.0 - lam))), int(round(w * math.sqrt(1.0 - lam)))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - rh // 2, 0), min(cy + rh - rh // 2, h)
    x0, x1 = max(cx - rw // 2, 0), min(cx + rw - rw // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return out, perm, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
