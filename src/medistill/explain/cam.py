"""Class activation maps through named taps: Score-CAM (two variants), Grad-CAM, Grad-CAM++,
Layer-CAM, and per-layer average feature maps.

Written here rather than wrapped from pytorch-grad-cam/TorchCAM because medistill must time
explanations, batch Score-CAM across (image, channel) pairs without materialising every masked
input, run hooks only for the unmasked pass, differentiate only down to the target layer, and
give teacher and student identical semantics; tests check the maps against pytorch-grad-cam.
Every function restores the model's train/eval mode and removes its hooks before returning.
All maps are ``[B, H, W]`` in [0, 1] at input resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medistill.models.taps import FeatureTaps
from medistill.models.modes import eval_mode

Tensor = torch.Tensor


def tokens_to_map(t: Tensor) -> Tensor:
    """ViT-style tokens ``[B, N, D]`` → ``[B, D, h, w]`` (a leading class token is dropped when
    ``N − 1`` is a square); 4-D maps pass through."""
    if t.dim() == 4:
        return t
    if t.dim() != 3:
        raise ValueError(f"cannot make a spatial map from a tensor of shape {tuple(t.shape)}")
    n = t.shape[1]
    for drop in (0, 1):
        side = math.isqrt(n - drop)
        if side * side == n - drop:
            return t[:, drop:].transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
    raise ValueError(f"{n} tokens do not form a square grid")


def minmax(m: Tensor, eps: float = 0.0) -> Tensor:
    """Per-image min-max normalisation of ``[B, H, W]``; a constant map becomes all zeros."""
    flat = m.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    rng = hi - lo
    return torch.where(rng > 0, (m - lo) / (rng + eps), torch.zeros_like(m))


def _upsample(m: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of maps ``[B, h, w]`` to ``[B, *size]``."""
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _classes(logits: Tensor, class_idx: int | Tensor | None) -> Tensor:
    if class_idx is None:
        return logits.argmax(1)
    if isinstance(class_idx, int):
        return torch.full((logits.shape[0],), class_idx, dtype=torch.long, device=logits.device)
    return torch.as_tensor(class_idx, dtype=torch.long, device=logits.device).reshape(-1)


def score_cam(model: nn.Module, images: Tensor, target_layer: str, class_idx: int | Tensor | None = None,
              batch_size: int = 64, variant: str = "original", top_k_channels: int | None = None) -> Tensor:
    """Score-CAM (docs/specs/methods.md C.5) → ``[B, H, W]`` in [0, 1].

    ``variant="original"``: channel weight = class probability of the masked input, map =
    ReLU(Σ w_k · upsampled A_k) (the Score-CAM authors' code). ``"logit_softmax"``: softmax over
    channels of the masked inputs' class logits, map at feature resolution then upsampled
    (pytorch-grad-cam / TorchCAM). Constant channels are skipped; ``top_k_channels`` keeps the
    k channels of largest activation variance per image. Masked forwards run without gradients
    and without hooks, ``batch_size`` (image, channel) pairs at a time.
    """
    if variant not in ("original", "logit_softmax"):
        raise ValueError(f"unknown Score-CAM variant {variant!r} (original, logit_softmax)")
    with eval_mode(model), torch.no_grad():
        with FeatureTaps(model, [target_layer], detach=True) as taps:
            logits = model(images)
        a = tokens_to_map(taps[target_layer]).float()                 # [B, K, h, w]
        cls = _classes(logits, class_idx)
        b, k = a.shape[:2]
        size = tuple(images.shape[-2:])
        up = F.interpolate(a, size=size, mode="bilinear", align_corners=False)   # [B, K, H, W]
        lo, hi = up.amin((2, 3)), up.amax((2, 3))
        valid = hi > lo
        if top_k_channels is not None and top_k_channels < k:
            var = a.flatten(2).var(2)
            keep = torch.zeros_like(valid)
            keep.scatter_(1, var.topk(top_k_channels, 1).indices, True)
            valid &= keep
        pairs = valid.nonzero()                                          # [P, 2] (image, channel)
        scores = torch.zeros(b, k, device=a.device)
        for chunk in pairs.split(batch_size):
            bi, ki = chunk[:, 0], chunk[:, 1]
            mask = (up[bi, ki] - lo[bi, ki, None, None]) / (hi - lo)[bi, ki, None, None]
            out = model(images[bi] * mask[:, None])
            s = torch.softmax(out.float(), 1) if variant == "original" else out.float()
            scores[bi, ki] = s.gather(1, cls[bi, None]).squeeze(1)
        if variant == "original":
            cam = F.relu((scores[:, :, None, None] * up).sum(1))
            return minmax(cam)
        w = torch.where(valid, scores, torch.full_like(scores, -math.inf)).softmax(1).nan_to_num(0.0)
        cam = minmax(F.relu((w[:, :, None, None] * a).sum(1)), 1e-7)
        return minmax(_upsample(cam, size))


def _grads(model: nn.Module, images: Tensor, target_layer: str, class_idx: int | Tensor | None) -> tuple[Tensor, Tensor]:
    """Activations ``[B, K, h, w]`` and d(class score)/d(activations), differentiating only down to the tap."""
    with eval_mode(model), torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)   # a graph to the tap even for frozen models
        with FeatureTaps(model, [target_layer]) as taps:
            logits = model(x)
        act = taps[target_layer]
        cls = _classes(logits, class_idx)
        score = logits.gather(1, cls[:, None]).sum()
        g = torch.autograd.grad(score, act)[0]
    return tokens_to_map(act.detach()).float(), tokens_to_map(g).float()


def grad_cam(model: nn.Module, images: Tensor, target_layer: str, class_idx: int | Tensor | None = None) -> Tensor:
    """Grad-CAM: ``ReLU(Σ_k mean_ij(∂z_c/∂A_k) · A_k)``, upsampled, min-max → ``[B, H, W]``."""
    a, g = _grads(model, images, target_layer, class_idx)
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
    return minmax(_upsample(minmax(cam, 1e-7), tuple(images.shape[-2:])))


def grad_cam_pp(model: nn.Module, images: Tensor, target_layer: str, class_idx: int | Tensor | None = None) -> Tensor:
    """Grad-CAM++ with the usual closed-form second/third-order weights."""
    a, g = _grads(model, images, target_layer, class_idx)
    g2, g3 = g.pow(2), g.pow(3)
    denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g3
    alpha = torch.where(g != 0, g2 / (denom + 1e-6), torch.zeros_like(g))
    w = (alpha * F.relu(g)).sum((2, 3), keepdim=True)
    cam = F.relu((w * a).sum(1))
    return minmax(_upsample(minmax(cam, 1e-7), tuple(images.shape[-2:])))


def layer_cam(model: nn.Module, images: Tensor, target_layer: str, class_idx: int | Tensor | None = None) -> Tensor:
    """Layer-CAM: ``ReLU(Σ_k ReLU(∂z_c/∂A_k) ⊙ A_k)`` (element-wise weights)."""
    a, g = _grads(model, images, target_layer, class_idx)
    cam = F.relu((F.relu(g) * a).sum(1))
    return minmax(_upsample(minmax(cam, 1e-7), tuple(images.shape[-2:])))


def average_feature_maps(model: nn.Module, images: Tensor, layers: list[str]) -> dict[str, Tensor]:
    """Channel-mean map of each layer (docs/specs/methods.md D.4), one forward pass for all layers →
    ``{layer: [B, H, W]}`` in [0, 1]."""
    with eval_mode(model), torch.no_grad(), FeatureTaps(model, layers, detach=True) as taps:
        model(images)
        out = {}
        for name in layers:
            m = tokens_to_map(taps[name]).float().mean(1)
            out[name] = minmax(_upsample(m, tuple(images.shape[-2:])), 1e-8)
    return out


def default_target_layer(model: nn.Module, input_size: int, in_chans: int = 3) -> str:
    """The deepest top-level module whose output is a map of at least 2×2 (warns below 4×4)."""
    from medistill.models.taps import list_taps

    cands = [(n, s) for n, s in list_taps(model, input_size, in_chans, max_depth=1) if len(s) == 4 and min(s[-2:]) >= 2]
    if not cands:
        raise ValueError("no spatial layer of at least 2×2; use a larger input or a stride-1 stem")
    return cands[-1][0]
