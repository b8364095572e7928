"""The per-step context every loss term reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class StepContext:
    """Read-only view of one training step.

    ``logits[name]``: ``[B, C]`` for every participant (teachers detached);
    ``feats[name][tap]``: tapped outputs; ``target``: ``[B]``; ``epoch``: fractional epoch
    (``epoch_index + fraction of the epoch done``); ``class_counts``/``class_prior``: ``[C]`` of
    the training split; ``teachers``/``students``: participant names in config order;
    ``mix``: with mixing augmentation (``train.mix``), ``(target of the image mixed in [B], lam)``:
    every image is ``lam`` of its own and ``1 − lam`` of the other.
    """

    logits: dict[str, Tensor]
    feats: dict[str, dict[str, Tensor]]
    target: Tensor
    epoch: float
    class_counts: Tensor
    class_prior: Tensor
    teachers: list[str]
    students: list[str]
    mix: tuple[Tensor, float] | None = None
