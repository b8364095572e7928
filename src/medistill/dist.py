"""Distributed helpers around ``torch.distributed`` (DDP via torchrun: gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world() -> int:
    return dist.get_world_size() if initialized() else 1


def init_from_env(device_type: str = "cpu") -> int:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns the world size.
    NCCL when the run computes on CUDA, gloo otherwise (NCCL cannot move CPU tensors, so
    picking it just because CUDA exists broke CPU runs on GPU hosts). Under torchrun a single
    process joins a group too, so ``--nproc_per_node=1`` exercises the same backend."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if (n > 1 or dist.is_torchelastic_launched()) and not initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return world()


def backend() -> str | None:
    """The process group's backend (``nccl``, ``gloo``), or None outside torchrun."""
    return str(dist.get_backend()) if initialized() else None


def barrier() -> None:
    if initialized():
        dist.barrier()


def gather_predictions(probs: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate every rank's shard and order by source index, so every rank holds the
    predictions of the whole evaluation set, exactly as a single process would."""
    if not initialized():
        return probs, labels, idx
    parts: list = [None] * world()
    dist.all_gather_object(parts, (probs, labels, idx))
    p = torch.cat([a for a, _, _ in parts])
    y = torch.cat([b for _, b, _ in parts])
    i = torch.cat([c for _, _, c in parts])
    order = i.argsort()
    return p[order], y[order], i[order]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if initialized():
        dist.all_reduce(t)
        t /= world()
    return t


def replica_divergence(params: list[torch.Tensor]) -> float:
    """Largest absolute difference between a rank's copy of ``params`` and the mean over ranks
    (0.0 when every rank holds the same values, or without a process group). One all-reduce of
    all parameters flattened together; every rank gets the same answer."""
    if not initialized() or not params:
        return 0.0
    flat = torch.cat([q.detach().reshape(-1).double() for q in params])
    mean = all_reduce_mean(flat.clone())
    worst = (flat - mean).abs().max().reshape(1)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def average_buffers(buffers: list[torch.Tensor]) -> None:
    """Replace every floating-point buffer (BatchNorm running mean/var) by its mean over ranks, in
    place; integer buffers (step counts) are equal on every rank and stay. DDP only copies rank 0's
    buffers at the start of each forward, so after an epoch each rank holds the statistics of its
    own last batches: without this, a distributed validation would score two different models
    (timm's training script averages them the same way, ``--dist-bn reduce``)."""
    floats = [b for b in buffers if b.is_floating_point()]
    if not initialized() or not floats:
        return
    flat = all_reduce_mean(torch.cat([b.detach().reshape(-1).double() for b in floats]))
    for b, v in zip(floats, flat.split([b.numel() for b in floats])):
        b.copy_(v.view_as(b))


def destroy() -> None:
    if initialized():
        dist.destroy_process_group()
