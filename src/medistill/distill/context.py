"""The per-step context every loss term reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass
class StepContext:
    """Read-only view of one training step.

    ``logits[name]``: ``[B, C]`` for every participant (teachers detached);
    ``feats[name][tap]``: tapped outputs; ``target``: ``[B]``; ``epoch``: fractional epoch
    (``epoch_index + fraction of the epoch done``); ``class_counts``/``class_prior``: ``[C]`` of
    the training split; ``teachers``/``students``: participant names in config order.
    """

    logits: dict[str, Tensor]
    feats: dict[str, dict[str, Tensor]]
    target: Tensor
    epoch: float
    class_counts: Tensor
    class_prior: Tensor
    teachers: list[str]
    students: list[str]
    extras: dict[str, Any] = field(default_factory=dict)
