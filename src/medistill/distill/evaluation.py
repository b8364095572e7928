"""Evaluation inside a run: validation after every epoch (checkpoints are selected on it, never
on test), settings a model tunes on validation (DHO's head combination), and the final test
evaluation of every student, teacher and ensemble member with the run's summary files."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from medistill.config import RunConfig
from medistill.distill.participants import Participant, input_side
from medistill.eval.card import model_card
from medistill.eval.metrics import classification_metrics, degenerate, predicted_classes, selection_score
from medistill.eval.predict import evaluate_splits, predict
from medistill.eval.tables import summary_table
from medistill.io import write_json, write_text
from medistill.models.cost import count_flops, count_params, model_cost
from medistill.models.ensemble import EnsembleModel
from medistill.models.factory import load_model_dir, save_model_dir
from medistill.models.timm_config import write_config
from medistill.rundir import student_dir, update_run_info

Tensor = torch.Tensor
VAL_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "auroc", "ece", "nll")


def teacher_val_recall(teachers: list[Participant], loader: Iterable) -> Tensor:
    """Per-class validation recall of every teacher ``[T, K]`` (a missing class counts 0)."""
    rows = []
    for t in teachers:
        probs, labels, _ = predict(t.model, t.pre, loader)
        rec = classification_metrics(probs, labels)["per_class_recall"]
        rows.append([0.0 if r is None else r for r in rec])
    return torch.tensor(rows)


def tune_on_validation(model: nn.Module, pre: nn.Module, loader: Iterable, device: torch.device, metric: str) -> None:
    """Extension point: a model with ``tune_on_validation(batches, score)`` (e.g. DHO's dual
    head) chooses its own settings on the validation split after every epoch."""
    if hasattr(model, "tune_on_validation"):
        batches = [(pre(x.to(device)), torch.as_tensor(y).to(device)) for x, y, _i, _v in loader]
        model.tune_on_validation(batches, lambda p, y: selection_score(classification_metrics(p, y), metric))


def validate(students: list[Participant], eval_model: Callable[[str], nn.Module], loader: Any, cfg: RunConfig,
             ordinal: bool, best: dict[str, float], save_to: Path | None, console: Any = None,
             watch: dict[str, Any] | None = None) -> tuple[dict[str, dict[str, Any]], bool]:
    """Validation metrics of every student, with the classes its predictions cover. A student
    that beats its best score (``best`` is updated in place) is saved under ``save_to`` (rank 0;
    ``None`` on the others). ``watch`` (state across epochs) and ``console``: a student that
    becomes degenerate or sits at chance is said (:func:`degenerate_warnings`)."""
    val, improved = {}, False
    for s in students:
        model = eval_model(s.name)
        probs, labels, _ = predict(model, s.pre, loader, cfg.train.channels_last)
        m = classification_metrics(probs, labels, ordinal=ordinal)
        val[s.name] = {**{k: m[k] for k in VAL_KEYS}, "predicted_classes": predicted_classes(probs)}
        score = selection_score(m, cfg.train.select_metric)
        if score > best[s.name]:
            best[s.name] = score
            improved = True
            if save_to is not None:
                save_model_dir(student_dir(save_to, s.name), model, s.spec)
    if console is not None and watch is not None and students:
        for line in degenerate_warnings(val, students[0].spec.num_classes, cfg.eval, watch):
            console.print(f"[yellow]warning:[/] {line}")
    return val, improved


def degenerate_warnings(val: dict[str, dict[str, Any]], num_classes: int, ev: Any, watch: dict[str, Any]) -> list[str]:
    """What to say after a validation: a student whose predictions cover one class or fewer than
    ``eval.degenerate_share`` of the classes (said when it becomes so), and one at chance
    (balanced accuracy 1/K) for ``eval.chance_epochs`` epochs in a row (said once per streak).
    ``watch`` keeps each student's state between epochs."""
    lines, chance = [], 1.0 / num_classes
    for name, m in val.items():
        n = m["predicted_classes"]
        was = watch.get(name, {"degenerate": False, "at_chance": 0})
        now = degenerate(n, num_classes, ev.degenerate_share)
        at_chance = was["at_chance"] + 1 if abs((m.get("balanced_accuracy") or 0.0) - chance) < 1e-6 else 0
        if now and not was["degenerate"]:
            lines.append(f"{name} predicts {n} of {num_classes} classes on validation (degenerate: its balanced "
                         f"accuracy cannot rise far above chance, {chance:.3f})")
        if at_chance == ev.chance_epochs:
            lines.append(f"{name} has been at chance on validation (balanced accuracy {chance:.3f}) for {at_chance} "
                         "epochs in a row: check the learning rate and loss weights, or train longer")
        watch[name] = {"degenerate": now, "at_chance": at_chance}
    return lines


def final_evaluation(out: Path, students: list[Participant], teachers: list[Participant], loaders: dict[str, Any],
                     cfg: RunConfig, device: torch.device, ordinal: bool, main: bool,
                     data_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Reload each saved student (the validation-selected checkpoint), evaluate it on val and test
    with its cost, and write its ``metrics.json``; then the run's ``metrics.json``,
    ``summary.json`` and ``summary.md`` with every teacher (and ensemble member) on the same test
    split. Every rank takes part in the sharded predictions; rank 0 writes."""
    results: dict[str, Any] = {}
    for s in students:
        d = student_dir(out, s.name)
        results[s.name] = _evaluate_student(d, loaders, cfg, device, ordinal, main)
    teacher_rows = _teacher_rows(teachers, loaders["test"], ordinal)
    if not main:
        return results
    primary = students[0].name
    write_json(out / "metrics.json", {**results[primary], "student": primary})
    # a model trained without a teacher is the baseline every distilled student is compared with
    role = "student" if teachers else "trained alone"
    rows = {**teacher_rows, **{n: {"role": role, **r} for n, r in results.items()}}
    write_json(out / "summary.json", rows)
    info = data_info or {}
    described = describe_run(cfg, teachers, students, info)
    update_run_info(out, description=described)
    write_text(out / "summary.md", summary_table(rows, cfg.eval.degenerate_share) + "\n## This run\n\n"
               + "\n".join(f"- {line}" for line in described) + "\n")
    by_name = {t.name: t for t in teachers}
    trows = [{"name": n, "arch": by_name[n].spec.arch, "input_size": input_side(by_name[n]), **r["test"]}
             for n, r in teacher_rows.items() if r["role"] == "teacher"]
    for s in students:   # the model card, with the numbers just measured
        write_text(student_dir(out, s.name) / "README.md",
                   model_card(s.name, s.spec, results[s.name], cfg, trows, info.get("source", cfg.data.name),
                              info.get("fingerprint"), info.get("counts", {}), info.get("unlabeled")))
    return results


def describe_run(cfg: RunConfig, teachers: list[Participant], students: list[Participant],
                 info: dict[str, Any]) -> list[str]:
    """What a run was, in sentences for summary.md and the report: the objective of each
    student (its terms with their settings), the schedule, every participant's input and where
    it came from, and the unlabelled images it learnt from."""
    def term(t: Any) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in t.params().items())
        return f"{t.weight:g}·{t.type}" + (f"({extra})" if extra else "")

    lines = []
    for s in students:
        mine = [term(t) for t in cfg.terms if t.student in (None, s.name)]
        lines.append(f"student {s.name!r} ({s.spec.arch}) objective: " + (" + ".join(mine) or
                                                                           f"{cfg.train.loss} (trained alone)"))
    lines.append(f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}, {cfg.optim.name} lr {cfg.optim.lr:g}, "
                 f"{cfg.sched.name} schedule, augmentation {cfg.data.augment}, seed {cfg.train.seed}; checkpoint "
                 f"selected on validation {cfg.train.select_metric}")
    for role, group in (("teacher", teachers), ("student", students)):
        for p in group:
            lines.append(f"input of {role} {p.name!r} ({p.spec.arch}): {input_side(p)} px, mean "
                         f"{[round(v, 3) for v in p.pre.mean.flatten().tolist()]}, std "
                         f"{[round(v, 3) for v in p.pre.std.flatten().tolist()]}, {p.pre.interpolation} — {p.origin}")
    u = info.get("unlabeled")
    lines.append(f"unlabelled images: {u['images']} from {u['source']}, learnt through {u['terms']}" if u
                 else "unlabelled images: none")
    return lines


def _evaluate_student(d: Path, loaders: dict[str, Any], cfg: RunConfig, device: torch.device, ordinal: bool,
                      main: bool) -> dict[str, Any]:
    model, pre, spec = load_model_dir(d)
    info = model_cost(model, spec, latency=cfg.train.latency and main)   # CPU cost, on a CPU copy
    model.to(device)
    pre.to(device)
    ev = cfg.eval
    res = evaluate_splits(model, pre, loaders, d, info.pop("model"), spec.class_names, ordinal=ordinal,
                          bootstrap=ev.bootstrap, bootstrap_seed=ev.bootstrap_seed, target_sensitivity=ev.target_sensitivity)
    res.update(info)
    if "threshold" in res and main:   # the operating point travels with the model
        spec.threshold, spec.threshold_rule = res["threshold"]["value"], res["threshold"]["rule"]
        write_json(d / "model.json", asdict(spec))
        write_config(d, spec)
    if hasattr(model, "validation_choice"):  # e.g. DHO's head combination, chosen on validation
        res.update(model.validation_choice())
    if main:
        write_json(d / "metrics.json", res)
    return res


def _teacher_rows(teachers: list[Participant], test_loader: Any, ordinal: bool) -> dict[str, dict[str, Any]]:
    """Test metrics and cost of every teacher; an ensemble's members are shown beside it."""
    rows = {}
    for t in teachers:
        test = classification_metrics(*predict(t.model, t.pre, test_loader)[:2], ordinal=ordinal)
        rows[t.name] = {"role": "teacher", "test": test, "model": _cost(t.model, t.pre),
                        **({"trained_on_test_images": t.test_overlap} if t.test_overlap else {})}
        if isinstance(t.model, EnsembleModel):
            for i, (pre, m) in enumerate(zip(t.model.pres, t.model.members)):
                test = classification_metrics(*predict(m, pre, test_loader)[:2], ordinal=ordinal)
                rows[f"{t.name}.member{i}"] = {"role": "ensemble member", "test": test, "model": _cost(m, pre)}
    return rows


def _cost(model: nn.Module, pre: Any) -> dict[str, Any]:
    return {"params": count_params(model), "flops": count_flops(model, (1, pre.in_chans, pre.input_size, pre.input_size))}
