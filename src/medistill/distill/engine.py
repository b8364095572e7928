"""The one training loop of medistill: N frozen teachers × M trainable students × loss terms.

``medistill train`` is this engine with no teacher and a supervised term; every distillation
method is a list of terms. Per step: one forward per teacher (or a cache lookup), one forward
per student, a dict of named losses per student, one backward, one optimizer step per student.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from medistill import dist
from medistill.config import RunConfig
from medistill.data.transforms import mix_batch
from medistill.device import autocast, grad_scaler, peak_memory_mb, reset_peak_memory, resolve_device, teacher_amp
from medistill.distill import checkpoint as ckpt
from medistill.distill.cache import make_teacher_caches, teacher_class_means
from medistill.distill.context import StepContext
from medistill.distill.evaluation import final_evaluation, teacher_val_recall, tune_on_validation, validate
from medistill.distill.logbook import EpochLog, epoch_line
from medistill.distill.objective import objective
from medistill.distill.methods import build_terms, check_mixing, supervised_terms, unlabeled_in_use
from medistill.distill.optim import Updater, finish_swa
from medistill.distill.participants import assemble_participants, check_training_data, fold_teachers, training_forwards
from medistill.distill.terms import TermSetup
from medistill.distill.terms.base import CLASS_MEANS, VAL_RECALL
from medistill.errors import ConfigError, NonFiniteLossError
from medistill.models.taps import FeatureTaps
from medistill.progress import progress_bar
from medistill.rundir import read_run_json, update_run_info, write_run_files
from medistill.models.modes import eval_mode

Tensor = torch.Tensor


class Engine:
    """Set up participants, data, terms and optimizers from a :class:`RunConfig`; ``run()``
    trains, selects on validation, evaluates on test and writes the run directory."""

    def __init__(self, cfg: RunConfig, resume: bool = False, download: bool = False, console: Console | None = None,
                 teacher_modules: dict[str, nn.Module] | None = None, force: bool = False):
        """``teacher_modules``: teachers given as in-memory modules (Python API), by teacher name;
        their config entries carry ``checkpoint: <memory>``. Each takes the data batch ``[B, C, S, S]``
        in [0, 1] resized to its ``input_size`` and normalised by its ``norm``."""
        self.cfg = cfg
        self.teacher_modules = dict(teacher_modules or {})
        self.resume = resume
        self.force = force   # train into an --out that holds other files or a finished run
        self.download = download
        self.console = console or Console(stderr=True)
        self.out, self.watch = Path(cfg.out), {}   # watch: each student's degenerate/at-chance state (validate)
        self.ckpt_path = self.out / ckpt.LAST

    # ----------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Device and process group → run directory checks → data and participants → terms,
        optimizers and teacher caches."""
        cfg = self.cfg
        self._setup_device()
        self._check_out()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self._seed(cfg.train.seed)
        self._setup_participants()
        self.class_counts = check_training_data(self.data, cfg, self.console).to(self.device)
        self.class_prior = self.class_counts / self.class_counts.sum()
        self.terms = self._make_terms().to(self.device)
        self.teacher_amp = teacher_amp(self.device, cfg.train)
        fold_teachers(self.teachers, set(self.teacher_modules))   # taps are known now: tapped convolutions stay
        self.use_unlabeled = unlabeled_in_use(self.terms, self.data, cfg, self.console)
        self.scaler = grad_scaler(self.device, cfg.train.amp)
        reset_peak_memory(self.device)
        self._make_optim()
        self.cache = make_teacher_caches(self.teachers, self.data, cfg, self.tap_shapes, self.console, self.main, self.world,
                                         self.use_unlabeled, self.teacher_amp)
        if self.data.use_resident():   # batches are gathered on the device: so are the teacher outputs
            self.cache = {k: c.to(self.device) for k, c in self.cache.items()}

    def _setup_device(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # cuDNN's autotuner picks the fastest kernels for fixed shapes; not when asked for determinism.
            torch.backends.cudnn.benchmark = not cfg.train.deterministic
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # torchrun: one process per rank; rank 0 alone writes files and prints.
        self.world = dist.init_from_env(self.device.type)
        self.main = dist.rank() == 0
        if not self.main:
            self.console = Console(quiet=True)

    def _check_out(self) -> None:
        """The output folder: writable, not another run or the user's files unless asked."""
        self._created_out = not self.out.exists()
        ckpt.check_out_folder(self.out, self.cfg, self.resume, self.force, self.main, self.world)

    def _setup_participants(self) -> None:
        """Data (the saved split when resuming), frozen teachers and students, all on the device."""
        fixed = read_run_json(self.out / "split.json") if self.resume else None
        self.data, self.teachers, self.students = assemble_participants(
            self.cfg, self.teacher_modules, self.device, self.console, self.download, fixed)
        self.parts = {p.name: p for p in self.teachers + self.students}

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        torch.manual_seed(seed)

    def _make_terms(self) -> nn.ModuleDict:
        cfg = self.cfg
        if cfg.teachers and not cfg.terms:
            raise ConfigError("a distillation run needs loss terms (config `terms:` or --method)")
        setup = TermSetup(
            students=[s.name for s in self.students], teachers=[t.name for t in self.teachers],
            num_classes=self.data.num_classes, class_counts=self.class_counts, tap_shapes={},
            models={n: p.model for n, p in self.parts.items()}, probe=self._probe,
        )
        specs = cfg.terms or supervised_terms(cfg)
        check_mixing(cfg.train.mix, specs)
        terms, self.term_specs = build_terms(specs, setup, self.parts, self._probe, self._provide)
        self.tap_shapes = setup.tap_shapes
        return terms

    def _probe(self, name: str, taps: list[str]) -> dict[str, tuple[int, ...]]:
        """Shapes (batch 1) of ``taps`` of participant ``name`` for one batch of data-sized images."""
        p = self.parts[name]
        x = torch.rand(2, self.data.channels, self.data.image_size, self.data.image_size, device=self.device)
        with eval_mode(p.model), FeatureTaps(p.model, taps, detach=True) as rec, torch.no_grad():
            p.logits(x)
        return {k: (1, *v.shape[1:]) for k, v in rec.outputs.items()}

    def _eval_loader(self, split: str):
        """Evaluation loader (sharded across ranks under torchrun; predictions are gathered)."""
        return self.data.loader(split, self._eval_batch(), train=False)

    def _full_loader(self, split: str):
        """Unsharded, unaugmented loader over a whole split (cache building, class means)."""
        from torch.utils.data import DataLoader

        return DataLoader(self.data.dataset(split, train=False), batch_size=self._eval_batch(), **self.data.workers())

    def _eval_batch(self) -> int:
        return self.data.eval_batch(self.cfg.train.eval_batch_size, self.cfg.train.eval_batch_mb)

    def _provide(self, need: tuple[str, ...]) -> Tensor:
        """A fact a term declared (``LossTerm.needs``), computed over a whole split."""
        if need[0] == VAL_RECALL:
            return teacher_val_recall(self.teachers, self._eval_loader("val"))
        if need[0] == CLASS_MEANS:
            _, teacher, tap = need
            return teacher_class_means(self.parts[teacher], tap, self._full_loader("train"), self.device,
                                       self.data.num_classes, self.out / f"class_means-{teacher}-{tap}.safetensors", self.main)
        raise ConfigError(f"no way to compute {need[0]!r} for a loss term")

    def _make_optim(self) -> None:
        self.steps_per_epoch = max(1, len(self._train_loader(0)))
        modules = {s.name: [p for t in self.terms.values() if t.student == s.name for p in t.parameters()]
                   for s in self.students}
        self.updater = Updater(self.students, modules, self.cfg.optim, self.cfg.sched, self.cfg.train,
                               self.steps_per_epoch, self.scaler, self._average_term_grads if self.world > 1 else None)
        self.nets, self.fixed_taps = training_forwards(self.students, self.cfg.train.compile, self.device, self.world)

    def _average_term_grads(self, group: list[str]) -> None:
        """DDP averages the students' gradients; the terms' own modules are averaged here."""
        for term in self.terms.values():
            if term.student in group:
                for p in term.parameters():
                    if p.grad is not None:
                        dist.all_reduce_mean(p.grad)

    def _drop_last(self) -> bool:
        # A trailing batch of one sample breaks BatchNorm in training mode.
        return math.ceil(self.data.train_items(self.use_unlabeled) / max(1, self.world)) % self.cfg.train.batch_size == 1

    def _train_loader(self, epoch: int):
        seed = self.cfg.train.seed * 100003 + epoch
        return self.data.loader("train", self.cfg.train.batch_size, train=True, seed=seed, drop_last=self._drop_last(),
                                unlabeled=self.use_unlabeled)

    # ----------------------------------------------------------------------------- training
    def _teacher_outputs(self, x: Tensor, idx: Tensor, view: Tensor) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        logits, feats = {}, {}
        for t in self.teachers:
            if t.name in self.cache:
                out = {k: v.to(self.device, non_blocking=True) for k, v in self.cache[t.name].lookup(idx, view).items()}
                logits[t.name] = out.pop("logits")
                feats[t.name] = out
                continue
            with FeatureTaps(t.model, sorted(t.taps), detach=True) as taps, torch.no_grad(), \
                    autocast(self.device, self.teacher_amp):
                logits[t.name] = t.logits(x, self.cfg.train.channels_last).float()
            feats[t.name] = dict(taps.outputs)
        return logits, feats

    def _student_outputs(self, x: Tensor, grad_for: set[str]) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        logits, feats = {}, {}
        for s in self.students:
            fixed = self.fixed_taps.get(s.name)
            with (nullcontext(fixed) if fixed else FeatureTaps(s.model, sorted(s.taps))) as taps, \
                    torch.set_grad_enabled(s.name in grad_for), autocast(self.device, self.cfg.train.amp):
                xs = s.pre(x)
                if self.cfg.train.channels_last:
                    xs = xs.contiguous(memory_format=torch.channels_last)
                logits[s.name] = self.nets[s.name](xs).float()
            feats[s.name] = {k: v.float() for k, v in taps.outputs.items()}
        return logits, feats

    def _objective(self, ctx: StepContext, student: str) -> tuple[Tensor, dict[str, Tensor]]:
        return objective(self.terms, self.term_specs, ctx, student, self.device, self.cfg.train.amp, self.ckpt_path)

    def _step(self, batch: list, epoch: int, step: int) -> dict[str, dict[str, Tensor]]:
        """One step on ``batch`` = [x [B, C, S, S] in [0, 1], y, index, view], emptied here: the raw images are
        freed before the backward pass, the step's memory peak (38 MB per 64×224² batch)."""
        x, y, idx, view = batch
        batch.clear()
        x = x.to(self.device, non_blocking=True)   # once per batch, from pinned memory on CUDA
        y = torch.as_tensor(y).to(self.device, non_blocking=True)
        if x.shape[0] == 0:
            return {}
        # one reduction instead of isfinite's four full-size passes (20 ms per 64×224² batch on 2
        # cores): a sum carries any NaN or ±Inf through (Inf − Inf is NaN), and pixels in [0, 1]
        # cannot overflow it
        if not torch.isfinite(x.sum()):
            raise NonFiniteLossError(f"input batch at epoch {epoch} step {step} holds NaN/Inf pixel values")
        mix = None
        if self.cfg.train.mix != "none":   # the same mixed pixels reach every teacher and student
            rng = np.random.default_rng([self.cfg.train.seed, epoch, step, dist.rank()])
            x, perm, lam = mix_batch(x, self.cfg.train.mix, self.cfg.train.mix_alpha, rng)
            mix = (y[perm], lam)
        t_logits, t_feats = self._teacher_outputs(x, torch.as_tensor(idx), torch.as_tensor(view))
        frac = epoch + (step + 1) / self.steps_per_epoch
        names = [s.name for s in self.students]
        logs: dict[str, dict[str, Tensor]] = {}
        sequential = self.cfg.train.update == "sequential" and len(self.students) > 1
        groups = [[n] for n in names] if sequential else [names]
        for gi, group in enumerate(groups):
            s_logits, s_feats = self._student_outputs(x, set(group))
            if gi == len(groups) - 1:
                del x
            ctx = StepContext(logits={**t_logits, **s_logits}, feats={**t_feats, **s_feats}, target=y, epoch=frac,
                              class_counts=self.class_counts, class_prior=self.class_prior,
                              teachers=[t.name for t in self.teachers], students=names, mix=mix,
                              labelled=(y >= 0) if self.use_unlabeled else None)
            total = torch.zeros((), device=self.device)
            for n in group:
                loss, lg = self._objective(ctx, n)
                total = total + loss
                logs[n] = lg
            self.updater.step(group, total, epoch)
        return logs

    def _eval_model(self, name: str) -> nn.Module:
        return self.updater.eval_model(name)

    def _stateful(self) -> dict[str, dict[str, Any]]:
        """Everything a checkpoint holds besides the term modules, by group and name."""
        return {"students": {s.name: s.model for s in self.students}, **self.updater.state_groups()}

    def _buffers(self) -> list[torch.Tensor]:
        """The buffers of the students, their EMA copies and the terms' modules."""
        modules = [s.model for s in self.students] + list(self.updater.emas.values()) + [self.terms]
        return [b for m in modules for b in m.buffers()]

    def fit(self) -> None:
        """Epochs: train → validate (select the checkpoint) → log → checkpoint; then SWA's average."""
        cfg = self.cfg
        if self.resume:
            start, best, bad = ckpt.load_checkpoint(self.out, self._stateful(), self.terms, self.console, self.main)
            self.console.print(f"resuming {self.out} at epoch {start}")
        else:
            if self.main:
                write_run_files(self.out, self.cfg, self.teachers, self.students, self.terms, self.device, self.data,
                                self.teacher_amp)
            start, best, bad = 0, {s.name: -math.inf for s in self.students}, 0
        log = EpochLog(self.out) if self.main else None
        try:
            for epoch in range(start, cfg.train.epochs):
                train_logs, train_time = self._train_epoch(epoch)
                if self.world > 1:   # one set of BatchNorm statistics on every rank before validating
                    dist.average_buffers(self._buffers())
                val, improved = self._validate(best)
                if self.updater.swas and epoch >= cfg.train.swa.start_epoch:
                    for s in self.students:
                        self.updater.swas[s.name].update_parameters(s.model)
                bad = 0 if improved else bad + 1
                diag = self._pop_diagnostics()   # every rank, so no rank accumulates them
                if log is not None:
                    log.write(epoch, {n: o.param_groups[0]["lr"] for n, o in self.updater.optims.items()}, train_logs, val,
                              diag, train_time, len(self.data.splits["train"]), 
                              {"seen": self.unlabeled_seen, "pool": len(self.data.splits["unlabeled"])} if self.use_unlabeled else None)
                    ckpt.save_checkpoint(self.out, epoch, best, bad, self._stateful(), self.terms)
                dist.barrier()
                self.console.print(epoch_line(epoch, cfg.train.epochs, train_logs, val, cfg.train.select_metric, train_time))
                if cfg.train.early_stopping_patience and bad >= cfg.train.early_stopping_patience:
                    self.console.print(f"early stopping: no validation improvement for {bad} epochs")
                    break
        finally:
            if log is not None:
                log.close()
        for taps in self.fixed_taps.values():
            taps.remove()
        if self.world > 1:   # DDP averaged the students' gradients, _average_term_grads the terms'
            diff = dist.replica_divergence([p for s in self.students for p in s.model.parameters()]
                                           + list(self.terms.parameters()) + self._buffers())
            if self.main:
                update_run_info(self.out, ddp_replica_max_abs_diff=diff)
        if self.updater.swas:
            finish_swa(self.students, self.updater.swas, self._full_loader("train"), self.device,
                       self.out if self.main else None, self.console, self.cfg.train)
            dist.barrier()

    def _train_epoch(self, epoch: int) -> tuple[dict[str, dict[str, float]], float]:
        """One pass over the training split; returns each student's mean loss terms (averaged
        over ranks) and the wall time."""
        cfg = self.cfg
        # Per-epoch seeding makes an epoch's shuffling and augmentation independent of how the
        # run got there, so a resumed run repeats the uninterrupted one exactly.
        torch.manual_seed(cfg.train.seed * 100003 + epoch)
        loader = self._train_loader(epoch)
        for s in self.students:
            s.model.train()
        sums: dict[str, dict[str, Tensor]] = defaultdict(dict)
        t0 = time.perf_counter()
        n_steps = n_unl = 0
        with progress_bar(self.console, cfg.train.progress) as bar:
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}", total=len(loader), info="")
            # not enumerate: its result tuple would keep the last batch alive through the next step
            for batch in loader:
                if self.use_unlabeled:
                    n_unl += int((torch.as_tensor(batch[1]) < 0).sum())
                box = list(batch)
                del batch   # _step holds the batch's only reference
                logs = self._step(box, epoch, n_steps)
                for s, lg in logs.items():
                    for k, v in lg.items():
                        sums[s][k] = sums[s][k] + v if k in sums[s] else v.clone()
                # reading the loss syncs with the device: only for a visible bar, every 10 steps
                if cfg.train.progress and n_steps % 10 == 0:
                    bar.update(task, info=" ".join(f"{s}:{float(lg['loss']):.3f}" for s, lg in logs.items()))
                bar.update(task, advance=1)
                n_steps += 1
        train_time = time.perf_counter() - t0
        self.unlabeled_seen = round(float(dist.all_reduce_mean(torch.tensor(float(n_unl), dtype=torch.float64))) * self.world)
        return {s: {k: float(dist.all_reduce_mean((v / n_steps).double())) for k, v in d.items()}
                for s, d in sums.items()}, train_time

    def _validate(self, best: dict[str, float]) -> tuple[dict[str, dict[str, Any]], bool]:
        for s in self.students:
            tune_on_validation(self._eval_model(s.name), s.pre, self._full_loader("val"), self.device,
                               self.cfg.train.select_metric)
        return validate(self.students, self._eval_model, self._eval_loader("val"), self.cfg, self.data.ordinal, best,
                        self.out if self.main else None, self.console, self.watch)

    def _pop_diagnostics(self) -> dict[str, dict[str, Any]]:
        """Per-class means of the diagnostics the terms gathered this epoch (e.g. UDD weights)."""
        diag = {}
        for key, term in self.terms.items():
            st = term.pop_stats(self.data.num_classes)
            if st:
                diag[key.replace("__", ".")] = st
        return diag

    def finalize(self) -> dict[str, Any]:
        loaders = {"val": self._eval_loader("val"), "test": self._eval_loader("test")}
        return final_evaluation(self.out, self.students, self.teachers, loaders, self.cfg, self.device,
                                self.data.ordinal, self.main, self.data.card_info(self.terms if self.use_unlabeled else None))

    def run(self) -> dict[str, Any]:
        try:
            try:
                self.setup()
            except BaseException:
                # A run that failed before writing anything leaves no empty folder behind.
                if getattr(self, "main", True) and getattr(self, "_created_out", False) and self.out.is_dir() and not any(self.out.iterdir()):
                    self.out.rmdir()
                raise
            self.fit()
            results = self.finalize()
            if self.main and (peak := peak_memory_mb(self.device)) is not None:
                update_run_info(self.out, peak_device_memory_mb=peak)
            # Rank 0 is still writing when the others return from finalize; tearing gloo down
            # while a peer is mid-flight aborted a rank at exit ("terminate called without an
            # active exception"), so every rank waits here and the group is destroyed in step.
            dist.barrier()
            return results
        finally:
            dist.destroy()
