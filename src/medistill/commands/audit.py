"""``medistill audit``: one report of what is wrong with a dataset before anything is trained or
scored on it — exact copies and label conflicts, near-duplicates, per-split class counts, image
shapes, and (with a trained run) likely label errors for a person to review."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from medistill.data import audit as A
from medistill.errors import DataError
from medistill.io import write_json, write_text

AUDIT_DIR = "audit"      # inside a run: RUN/audit/{audit.json, label_issues.csv, images/}


def _open(data: str | Path, run: str | Path | None, class_names: list[str] | None) -> tuple[Any, Path | None]:
    """The data bundle to audit and the run whose models score it: ``data`` may itself be a run
    (its data and saved split); otherwise the data split as a run would split it."""
    from medistill.config import DataConfig
    from medistill.data.dataset import build_data
    from medistill.rundir import load_run_config, read_run_json

    p = Path(data)
    if (p / "config.yaml").is_file() and (p / "split.json").is_file():
        cfg = load_run_config(p)
        bundle = build_data(cfg.data.model_copy(update={"duplicates": "off", "unlabeled": None,
                                                       **({"class_names": class_names} if class_names else {})}),
                            fixed_splits=read_run_json(p / "split.json"))
        return bundle, Path(run) if run else p
    return build_data(DataConfig(name=str(data), duplicates="off", class_names=class_names)), Path(run) if run else None


def _models(run: Path) -> list[Any]:
    """The saved models a run (its students), an ensemble (its members) or a model folder stands for."""
    from medistill.models.saved import load_student
    from medistill.rundir import resolve

    target = resolve(run)
    if not target.models:
        raise DataError(f"{run} holds no trained model to find label errors with")
    return [load_student(m) for m in target.models]


def _check_classes(models: list[Any], names: list[str], run: Path, data: str) -> None:
    """The run's models must score the audited data's classes: the same count, and the same
    names where both carry real names (not bare ids)."""
    for m in models:
        theirs = list(m.class_names)
        k = int(m.config.get("num_classes", len(theirs) or len(names)))
        if k != len(names):
            raise DataError(f"--run {run}: its model predicts {k} classes but {data} has {len(names)} "
                            f"({', '.join(names[:4])}{', …' if len(names) > 4 else ''}); audit with a run trained on "
                            "this data")
        ids = [str(c) for c in range(k)]
        if theirs and theirs != ids and names != ids and theirs != names:
            raise DataError(f"--run {run}: its classes ({', '.join(theirs[:4])}…) are not {data}'s "
                            f"({', '.join(names[:4])}…); audit with a run trained on this data")


def audit_data(data: str | Path, run: str | Path | None = None, out: str | Path | None = None,
               near_threshold: int = A.NEAR_THRESHOLD, oof: int | None = None,
               class_names: list[str] | None = None) -> dict[str, Any]:
    """Audit ``data`` (a dataset or a run); write ``audit.json`` (and ``label_issues.csv`` when a
    run's models can score the images) to ``out`` and return the report."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise DataError(f"--out {out} is a file; audit writes a folder (audit.json, label_issues.csv, images/): "
                        "name a new or existing folder")
    bundle, model_run = _open(data, run, class_names)
    src, splits = bundle.source, bundle.splits
    where = A.split_of(splits, len(src))
    every = np.concatenate([splits[k] for k in A.SPLITS])
    groups = A.copy_groups(src, splits, decode=True)
    exact = A.summarize_copies(groups, src.class_names)
    exact["groups"] = [{"indices": g.indices, "splits": g.splits, "labels": [src.class_names[c] for c in g.labels],
                        "images": [src.path(i) for i in g.indices], "label_conflict": g.conflict} for g in groups]
    same = {i: n for n, g in enumerate(groups) for i in g.indices}
    hashes = A.perceptual_hashes(src, every)
    near = [(int(every[a]), int(every[b]), d) for a, b, d in A.near_pairs(hashes, near_threshold)]
    near = [(a, b, d) for a, b, d in near if same.get(a, -1) != same.get(b, -2)]   # exact copies are counted above
    report: dict[str, Any] = {
        "data": src.description, "fingerprint": src.fingerprint, "images": int(len(every)),
        "classes": A.class_table(src, splits), "shapes": A.shapes_seen(src, every), "exact": exact,
        "near": {"method": "imagehash pHash, 64 bits", "threshold_bits": near_threshold, "pairs": len(near),
                 "across_splits": sum(where[a] != where[b] for a, b, _ in near),
                 "different_labels": sum(int(src.labels[a] != src.labels[b]) for a, b, _ in near),
                 "list": [{"a": a, "b": b, "bits": d, "splits": [where[a], where[b]], "images": [src.path(a), src.path(b)],
                           "labels": [src.class_names[src.labels[a]], src.class_names[src.labels[b]]]}
                          for a, b, d in near[:2000]]},
    }
    out_dir = Path(out) if out else (model_run / AUDIT_DIR if model_run and (model_run / "config.yaml").is_file()
                                     else Path(f"audit-{Path(src.description).stem}"))
    if model_run is not None:
        report["label_issues"] = _label_issues(bundle, model_run, oof, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "audit.json", report)
    report["out"] = str(out_dir)
    return report


def _label_issues(bundle: Any, run: Path, oof: int | None, out_dir: Path) -> dict[str, Any]:
    from medistill.eval.label_issues import issue_rows, model_outputs, out_of_fold_probs, rank_issues

    models = _models(run)
    src, names = bundle.source, bundle.class_names
    _check_classes(models, names, run, bundle.source.description)
    if oof:
        from medistill.eval.label_issues import check_folds

        check_folds(src.labels[bundle.splits["train"]], oof, bundle.num_classes)
    rows, per_split = [], {}
    for split in (["train"] if oof else []) + ["val", "test"]:
        idx = bundle.splits[split]
        probs, feats = model_outputs(models, bundle.dataset(split, train=False))
        labels = src.labels[idx]
        if split == "train":
            probs = out_of_fold_probs(feats, labels, oof, bundle.num_classes)
        ranked = rank_issues(labels, probs)
        per_split[split] = int(len(ranked))
        rows += issue_rows(src, split, idx, labels, probs, ranked, names, out_dir / "images")
    rows.sort(key=lambda r: r["p_given"])
    for n, r in enumerate(rows, 1):
        r["rank"] = n
    path = out_dir / "label_issues.csv"
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=["rank", "split", "index", "image", "given", "suggested", "p_given", "p_suggested"])
    w.writeheader()
    w.writerows(rows)
    write_text(path, text.getvalue())
    return {"method": "cleanlab find_label_issues (self-confidence ranking) on out-of-sample probabilities of "
                      f"{run}" + (f"; training images: {oof}-fold out-of-fold logistic regression on the model's "
                                  "penultimate features (that model saw them: fewer errors found than with K retrained "
                                  "models)" if oof else "; training images not scored (add --oof K)"),
            "flagged": per_split, "csv": str(path), "top": rows[:20]}


def print_audit(report: dict[str, Any], console: Console) -> None:
    """The terminal summary: one table of findings, then where the files are."""
    t = Table(title=f"audit of {report['data']} ({report['images']} images)")
    t.add_column("finding")
    t.add_column("count", justify="right")
    t.add_column("detail")
    ex = report["exact"]
    t.add_row("label conflicts (same pixels, two labels)", str(ex["label_conflict_groups"]),
              ", ".join(f"{n} {k}" for k, n in ex["label_conflicts"].items()) or "none")
    t.add_row("exact copies across splits", str(sum(ex["across_splits"].values())),
              ", ".join(f"{n} {k}" for k, n in ex["across_splits"].items()) or "none")
    t.add_row("exact copies within a split", str(sum(ex["within_split"].values())),
              ", ".join(f"{n} in {k}" for k, n in ex["within_split"].items()) or "none")
    nr = report["near"]
    t.add_row(f"near-duplicates (pHash ≤ {nr['threshold_bits']} bits)", str(nr["pairs"]),
              f"{nr['across_splits']} across splits, {nr['different_labels']} with different labels")
    cl = report["classes"]
    t.add_row("classes missing from a split", str(sum(len(v) for v in cl["missing"].values())),
              "; ".join(f"{k}: {', '.join(v)}" for k, v in cl["missing"].items()) or "none")
    t.add_row("image shapes", str(len(report["shapes"])), ", ".join(f"{k} ({n})" for k, n in report["shapes"].items()))
    if "label_issues" in report:
        li = report["label_issues"]
        t.add_row("likely label errors", str(sum(li["flagged"].values())),
                  ", ".join(f"{n} in {k}" for k, n in li["flagged"].items()) + f" → {li['csv']}")
    console.print(t)
    counts = Table(title="images per class")
    counts.add_column("class")
    for k in A.SPLITS:
        counts.add_column(k, justify="right")
    for c, name in enumerate(cl["classes"]):
        counts.add_row(name, *(str(cl["counts"][k][c]) for k in A.SPLITS))
    console.print(counts)
    console.print(f"written: {report['out']}/audit.json")
