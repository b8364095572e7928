"""A student's objective for one step: the weighted sum of its loss terms, each term and
diagnostic logged. Terms that read labels see only the labelled images of a batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from medistill.device import autocast
from medistill.distill.context import StepContext
from medistill.errors import NonFiniteLossError

Tensor = torch.Tensor


def objective(terms: nn.ModuleDict, term_specs: dict[str, Any], ctx: StepContext, student: str, device: torch.device,
              amp: str, ckpt_path: Path) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of ``student``'s terms and every term and diagnostic, detached. Logged
    values stay device tensors (summed over the epoch, read once at its end): a ``float()`` per
    term per step would stall a GPU on every step. One finiteness check per step remains."""
    total = torch.zeros((), device=device)
    logs: dict[str, Tensor] = {}
    labelled = None   # the labelled rows of a batch with unlabelled images, made once per step
    for key, term in terms.items():
        if term.student != student:
            continue
        spec = term_specs[key.replace("__", ".")]
        ramp = min(ctx.epoch / spec.warmup_epochs, 1.0) if spec.warmup_epochs > 0 else 1.0
        c = ctx
        if ctx.labelled is not None and term.uses_labels():
            labelled = ctx.only(ctx.labelled) if labelled is None else labelled
            c = labelled
        # Mixed precision also covers method-owned modules (UMKD's CFL blocks dominate its
        # step); the loss functions themselves compute in float32.
        if c.target.numel() == 0:   # a batch of unlabelled images only: no label term
            out: Any = ctx.logits[student].sum() * 0.0
        else:
            with autocast(device, amp):
                out = term(c)
        value, diag = (out if isinstance(out, tuple) else (out, {}))
        value = value.float()
        name = key.split("__", 1)[1]
        total = total + spec.weight * ramp * value
        logs[name] = value.detach()
        for k, v in diag.items():
            logs[f"{name}.{k}"] = v.detach().float() if isinstance(v, Tensor) else torch.tensor(float(v), device=device)
    if not torch.isfinite(total):
        bad = next((n for n, v in logs.items() if "." not in n and not torch.isfinite(v)), "loss")
        raise NonFiniteLossError(
            f"loss term {bad!r} of student {student!r} is {float(logs.get(bad, total))} at epoch {ctx.epoch:.2f}; "
            f"training stopped. The last good checkpoint ({ckpt_path}) is intact. Check the inputs for NaN/Inf, "
            "lower the learning rate, or enable train.grad_clip.")
    logs["loss"] = total.detach()
    return total, logs
