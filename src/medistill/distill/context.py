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
    every image is ``lam`` of its own and ``1 − lam`` of the other; ``labelled``: ``[B]`` bool when
    the batch may hold unlabelled images (their ``target`` is −1), None when every image has a label.
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
    labelled: Tensor | None = None

    def only(self, rows: Tensor) -> "StepContext":
        """The same step restricted to the images ``rows`` (``[B]`` bool): what a term that reads
        labels sees of a batch with unlabelled images. Mixing with unlabelled images is refused at
        set-up, so ``mix`` never reaches here."""
        return StepContext(
            logits={k: v[rows] for k, v in self.logits.items()},
            feats={p: {k: v[rows] for k, v in f.items()} for p, f in self.feats.items()},
            target=self.target[rows], epoch=self.epoch, class_counts=self.class_counts,
            class_prior=self.class_prior, teachers=self.teachers, students=self.students, mix=None, labelled=None)
