"""Optimizer and learning-rate schedule of a student: parameter groups (body, head, method
modules), any optimizer of timm's factory (SGD, Adam, AdamW — PyTorch's own classes — and LAMB,
LARS, Adan, …), and a per-step warm-up + cosine / step / constant schedule."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from medistill.config import OptimConfig, SchedConfig, TrainConfig
from medistill.errors import ConfigError


def build_optimizer(model: nn.Module, module_params: list[nn.Parameter], o: OptimConfig) -> torch.optim.Optimizer:
    """Groups: the body at ``lr``; the classifier head at ``head_lr``; the parameters of modules a
    term owns (regressors, projectors, CFL blocks) at ``module_lr`` (both default to ``lr``).
    Each group is split as timm's ``param_groups_weight_decay`` does: biases and normalisation
    weights (tensors of one dimension or less) get no weight decay."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    body = [p for p in model.parameters() if id(p) not in head_ids]
    heads = [p for p in model.parameters() if id(p) in head_ids]
    groups = []
    for params, lr in ((body, o.lr), (heads, o.head_lr or o.lr), (module_params, o.module_lr or o.lr)):
        trainable = [p for p in params if p.requires_grad]
        decay = [p for p in trainable if p.ndim > 1]
        no_decay = [p for p in trainable if p.ndim <= 1]
        groups += [{"params": g, "lr": lr, "weight_decay": wd}
                   for g, wd in ((decay, o.weight_decay), (no_decay, 0.0)) if g]
    from timm.optim import create_optimizer_v2

    # timm names SGD with Nesterov momentum "sgd" and without it "momentum".
    name = "momentum" if o.name == "sgd" and not o.nesterov else o.name
    extra = {"momentum": o.momentum} if name in ("sgd", "momentum", "lars", "larc", "nlars", "nlarc", "rmsprop", "rmsproptf") else {}
    return create_optimizer_v2(groups, name, lr=o.lr, weight_decay=o.weight_decay, **extra)


def lr_factor(step: int, sc: SchedConfig, lr: float, epochs: int, steps_per_epoch: int) -> float:
    """Multiplier of every group's base learning rate at optimizer step ``step`` (0-based):
    linear warm-up over ``warmup_epochs``, then cosine to ``min_lr``, step decay, or constant."""
    total = epochs * steps_per_epoch
    warm = int(round(sc.warmup_epochs * steps_per_epoch))
    if warm and step < warm:
        return (step + 1) / warm
    if sc.name == "cosine":
        prog = (step - warm) / max(1, total - warm)
        floor = sc.min_lr / max(lr, 1e-12)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))
    if sc.name == "step":
        return sc.gamma ** (step // (sc.step_size * steps_per_epoch))
    return 1.0


def build_scheduler(opt: torch.optim.Optimizer, sc: SchedConfig, lr: float, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR is PyTorch's own per-step scheduler; lr_factor holds warm-up + decay.
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, sc, lr, epochs, steps_per_epoch))


def averaged_copies(students: list, train: TrainConfig) -> tuple[dict[str, AveragedModel], dict[str, AveragedModel]]:
    """torch's averaged copies of each student: SWA (``train.swa``, an equal-weight average of
    epochs) and EMA (``train.ema``, per step, buffers averaged too)."""
    swas = {s.name: AveragedModel(s.model) for s in students} if train.swa.enabled else {}
    emas = {}
    if train.ema.enabled:
        emas = {s.name: AveragedModel(s.model, multi_avg_fn=get_ema_multi_avg_fn(train.ema.decay), use_buffers=True)
                for s in students}
    return swas, emas


@torch.no_grad()
def finish_swa(students: list, swas: dict[str, AveragedModel], train_loader: Any, device: torch.device,
               save_to: Path | None, console: Any, train: TrainConfig) -> None:
    """Re-estimate BatchNorm statistics of each averaged model on the training split and save it
    as the student (under ``save_to``; ``None`` on ranks that do not write): the averaged weights
    are what evaluation and later distillation see."""
    from medistill.models.factory import save_model_dir
    from medistill.rundir import student_dir

    for s in students:
        avg = swas[s.name]
        if int(avg.n_averaged) == 0:
            raise ConfigError(f"SWA never started (start_epoch {train.swa.start_epoch} ≥ epochs "
                              f"{train.epochs} or early stopping came first)")
        m = avg.module
        # torch's update_bn: a cumulative average over one pass, each model's preprocessing applied
        update_bn((s.pre(x.to(device)) for x, *_ in train_loader), m)
        m.eval()
        if save_to is not None:
            save_model_dir(student_dir(save_to, s.name), m, s.spec)
        console.print(f"SWA: {s.name} saved as the average of {int(avg.n_averaged)} epochs")
