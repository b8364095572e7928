"""Parameter count, FLOPs (torch's own FlopCounterMode) and CPU latency of a model."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medistill.models.modes import eval_mode, model_device


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on ``input_shape`` (batch included), as counted by
    ``torch.utils.flop_counter`` (a multiply-add counts 2; MACs = FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with eval_mode(model), counter, torch.no_grad():
        model(torch.zeros(*input_shape, device=model_device(model)))
    return int(counter.get_total_flops())


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median and IQR of wall-clock forward time on the CPU, warm-up runs discarded."""
    x = torch.zeros(*input_shape)
    times = []
    with eval_mode(model), torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2],
            "batch": input_shape[0], "threads": torch.get_num_threads()}


def model_cost(model: nn.Module, spec: Any, latency: bool = True) -> dict[str, Any]:
    """Params, FLOPs at the model's input size and (optionally) CPU batch-1 latency; ``spec``
    is a :class:`~medistill.models.factory.ModelSpecRecord`."""
    shape = (1, spec.in_chans, spec.input_size, spec.input_size)
    out: dict[str, Any] = {"model": {"params": count_params(model), "flops": count_flops(model, shape), "arch": spec.arch,
                                     "input_size": spec.input_size}}
    if latency:
        out["latency"] = {"cpu_batch1": latency_ms(model, shape)}
    return out
