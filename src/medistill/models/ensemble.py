"""Teacher ensembles: several trained models that act as one teacher.

:class:`EnsembleModel` runs every member with its own preprocessing on the shared batch
``[B, C, S, S]`` in [0, 1] and returns logits whose softmax is the aggregated prediction, so a
distillation term, the cache and the metrics treat the ensemble exactly like a single teacher.
The ensemble *directory* (``ensemble.json`` and its members) is a run-directory format:
:mod:`medistill.rundir` writes, reads and loads it.
"""

from __future__ import annotations

import torch
from torch import nn

from medistill.errors import ModelError

AGGREGATIONS = ("prob_mean", "logit_mean")


class EnsembleModel(nn.Module):
    """Members ``(preprocess, model)`` applied to one batch.

    ``prob_mean``: returns ``log(mean_m softmax(z_m))`` ``[B, K]`` (a valid logit vector whose
    softmax is the averaged probabilities; temperature scaling in KD then sharpens/softens the
    ensemble's prediction, not each member's). ``logit_mean``: returns ``mean_m z_m``.
    """

    def __init__(self, members: list[tuple[nn.Module, nn.Module]], aggregation: str = "prob_mean"):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ModelError(f"unknown ensemble aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
        self.pres = nn.ModuleList(p for p, _ in members)
        self.members = nn.ModuleList(m for _, m in members)
        self.aggregation = aggregation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zs = torch.stack([m(p(x)).float() for p, m in zip(self.pres, self.members)])   # [M, B, K]
        if self.aggregation == "logit_mean":
            return zs.mean(0)
        # logsumexp over members of log-softmax, minus log M: the log of the mean probability,
        # computed without leaving log space (no underflow for confident members).
        return torch.logsumexp(torch.log_softmax(zs, -1), 0) - torch.log(torch.tensor(float(zs.shape[0])))
