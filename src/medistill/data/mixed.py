"""Batches with a stated share of unlabelled images (``data.unlabeled_ratio``).

torch's samplers draw from one pool; a fixed mix per batch needs two, so this batch sampler
is written here. An epoch is one shuffled pass over the labelled images; every batch takes
``round(r·B)`` unlabelled images from a fresh shuffle of the pool (shuffled again when one epoch
needs more than the pool holds; a larger pool is sampled, a different part each epoch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np


class MixedBatchSampler:
    """Batch positions into a dataset whose first ``n_labelled`` items are labelled and whose
    next ``n_unlabeled`` are not. Seeded per epoch (the loader's seed), so a resumed run repeats."""

    def __init__(self, n_labelled: int, n_unlabeled: int, batch_size: int, ratio: float, seed: int):
        self.n_l, self.n_u, self.seed = n_labelled, n_unlabeled, seed
        self.n_unl = min(batch_size - 1, int(round(ratio * batch_size))) if n_unlabeled else 0
        self.n_lab = batch_size - self.n_unl

    def __len__(self) -> int:
        return math.ceil(self.n_l / self.n_lab)

    def unlabeled_per_epoch(self) -> int:
        """Unlabelled images drawn in one epoch (may exceed the pool: then some twice)."""
        return len(self) * self.n_unl

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, 7919])
        lab = rng.permutation(self.n_l)
        # enough passes over the pool for the epoch, each shuffled on its own
        passes = max(1, math.ceil(self.unlabeled_per_epoch() / max(1, self.n_u)))
        unl = np.concatenate([rng.permutation(self.n_u) for _ in range(passes)]) + self.n_l if self.n_u else np.empty(0, int)
        for b in range(len(self)):
            li = lab[b * self.n_lab:(b + 1) * self.n_lab]
            ui = unl[b * self.n_unl:(b + 1) * self.n_unl]
            yield [int(i) for i in np.concatenate([li, ui])]
