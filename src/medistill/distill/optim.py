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


class Updater:
    """The optimisation of a run's students in one object: per student an optimizer (body, head,
    the student's term modules) and its per-step schedule, the fp16 gradient scaler, gradient
    clipping, SWA's constant rate and the EMA copy. ``step`` is one backward and one update."""

    def __init__(self, students: list, term_modules: dict[str, list[nn.Parameter]], o: OptimConfig, sc: SchedConfig,
                 train: TrainConfig, steps_per_epoch: int, scaler: Any = None, average_terms: Any = None):
        """``term_modules``: student name → the parameters of its terms (projectors, regressors);
        ``average_terms(group)``: under DDP, averages the term gradients across ranks (their
        modules are not wrapped in DDP)."""
        self.train, self.scaler, self.average_terms = train, scaler, average_terms
        self.models = {s.name: s.model for s in students}
        self.optims: dict[str, torch.optim.Optimizer] = {}
        self.scheds: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        for s in students:
            self.optims[s.name] = build_optimizer(s.model, term_modules.get(s.name, []), o)
            self.scheds[s.name] = build_scheduler(self.optims[s.name], sc, o.lr, train.epochs, steps_per_epoch)
        self.swas, self.emas = averaged_copies(students, train)

    def step(self, group: list[str], total: torch.Tensor, epoch: int) -> bool:
        """Backward of ``total`` and one optimizer step per student of ``group``: clipping (of the
        true gradients under fp16), the schedule, SWA's rate and the EMA copy. Returns whether the
        optimizers stepped (an fp16 overflow skips them; the schedule then waits too)."""
        for n in group:
            self.optims[n].zero_grad(set_to_none=True)
        (self.scaler.scale(total) if self.scaler else total).backward()
        if self.average_terms is not None:
            self.average_terms(group)
        for n in group:
            if self.train.grad_clip:
                if self.scaler:   # clip the true gradients, not the scaled ones
                    self.scaler.unscale_(self.optims[n])
                params = [p for g in self.optims[n].param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.train.grad_clip)
            if self.scaler:
                self.scaler.step(self.optims[n])
            else:
                self.optims[n].step()
        stepped = True
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale    # the scale drops exactly when the step was skipped
        swa = self.train.swa
        for n in group:
            if stepped:
                self.scheds[n].step()
            if swa.enabled and swa.lr and epoch >= swa.start_epoch:
                for g in self.optims[n].param_groups:
                    g["lr"] = swa.lr
            if n in self.emas:
                self.emas[n].update_parameters(self.models[n])
        return stepped

    def eval_model(self, name: str) -> nn.Module:
        """What is validated, selected and saved: the EMA copy when there is one."""
        return self.emas[name].module if name in self.emas else self.models[name]

    def state_groups(self) -> dict[str, dict[str, Any]]:
        """The checkpointed objects besides the students, by group and name."""
        groups: dict[str, dict[str, Any]] = {"ema": self.emas, "swa": self.swas, "optim": self.optims, "sched": self.scheds}
        if self.scaler is not None:   # fp16 loss scale: resuming without it would restart at 2**16
            groups["scaler"] = {"scaler": self.scaler}
        return groups
