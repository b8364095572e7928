""""Did distillation help?": a distilled student against the same student trained alone, scored
on the very same test images with a *paired* bootstrap interval of the difference.

Two runs are comparable only when their test splits hold the same images of the same dataset
(``split.json``: fingerprint and test indices). Each bootstrap resample draws one set of test
images (stratified by class, as :func:`medistill.eval.metrics.bootstrap_ci`) and scores both
models on it, so the interval is that of the difference, not of two independent estimates: a
harder resample lowers both, and the pairing removes that shared variation.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from medistill.errors import ConfigError
from medistill.eval.metrics import CI_METRICS, _resample_weights, bootstrap_stats, degenerate, predicted_classes

COMPARISON_FILE = "comparison.json"
SELFTRAIN_FILE = "comparison_selftrain.json"
NAMES = {"balanced_accuracy": "bal. ACC", "accuracy": "ACC", "macro_f1": "macro-F1", "auroc": "AUROC"}


def paired_bootstrap(p_a: np.ndarray, p_b: np.ndarray, y: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Model A minus model B on the same images: for each metric of :data:`CI_METRICS`, the
    values of A and B on all images, their difference and the percentile interval of the
    difference over ``n_resamples`` stratified resamples (the same resample for both models).

    ``p_a``, ``p_b``: ``[N, C]`` class probabilities of the same N images in the same order;
    ``y``: ``[N]`` labels. ``share_a_better``: the fraction of resamples where A is ahead."""
    if p_a.shape != p_b.shape or len(y) != len(p_a):
        raise ConfigError(f"paired comparison needs the same images: shapes {p_a.shape}, {p_b.shape}, labels {len(y)}")
    full = np.ones((1, len(y)))
    w = _resample_weights(y, n_resamples, seed, stratified=True)
    pa, pb = bootstrap_stats(p_a, y, full), bootstrap_stats(p_b, y, full)
    sa, sb = bootstrap_stats(p_a, y, w), bootstrap_stats(p_b, y, w)
    alpha = (1 - level) / 2
    out: dict[str, dict[str, Any]] = {}
    for k in CI_METRICS:
        if k not in pa or k not in pb:
            continue
        d = sa[k] - sb[k]
        d = d[~np.isnan(d)]
        out[k] = {"a": float(pa[k][0]), "b": float(pb[k][0]), "diff": float(pa[k][0] - pb[k][0]),
                  "ci95": [float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))],
                  "share_a_better": float((d > 0).mean())}
    return out


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``predictions_test.csv`` → (image indices ``[N]``, labels ``[N]``, probabilities ``[N, C]``)."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing: evaluate the run first (medistill evaluate RUN)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"{path}: no predictions")
    prob_keys = sorted((k for k in rows[0] if k.startswith("prob_")), key=lambda k: int(k[5:]))
    idx = np.array([int(r["index"]) for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([[float(r[k]) for k in prob_keys] for r in rows])
    return idx, y, p


def check_same_test(distilled: Path, alone: Path) -> None:
    """Refuse two runs whose test splits are not the same images of the same data."""
    from medistill.rundir import read_run_json

    a, b = read_run_json(distilled / "split.json"), read_run_json(alone / "split.json")
    fa, fb = a.get("fingerprint"), b.get("fingerprint")
    if fa and fb and fa != fb:
        raise ConfigError(f"{alone} was trained on other data than {distilled} (data fingerprints {fb[:12]}… vs "
                          f"{fa[:12]}…): a paired comparison needs the same test images")
    if sorted(a.get("test", [])) != sorted(b.get("test", [])):
        raise ConfigError(f"{alone} has another test split than {distilled} ({len(b.get('test', []))} vs "
                          f"{len(a.get('test', []))} images, or other ones): train it with the same data, "
                          "data.split_seed and fractions")


def _pairs(distilled: Path, alone: Path) -> list[tuple[str, str]]:
    """Students paired by name; two single-student runs are paired whatever their names."""
    from medistill.rundir import student_dirs

    a = [d.name for d in student_dirs(distilled)]
    b = [d.name for d in student_dirs(alone)]
    if len(a) == 1 and len(b) == 1:
        return [(a[0], b[0])]
    pairs = [(n, n) for n in a if n in b]
    if not pairs:
        raise ConfigError(f"no student of {distilled} ({', '.join(a) or 'none'}) has a namesake in {alone} "
                          f"({', '.join(b) or 'none'})")
    return pairs


def compare_runs(distilled: str | Path, alone: str | Path, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Each student of ``distilled`` against its namesake in ``alone`` on their shared test split:
    ``{student: {"alone": name, "arch": (distilled, alone), "n_images", "metrics": paired_bootstrap}}``."""
    from medistill.rundir import student_dir

    distilled, alone = Path(distilled), Path(alone)
    check_same_test(distilled, alone)
    out: dict[str, Any] = {}
    for s, b in _pairs(distilled, alone):
        ia, ya, pa = read_predictions(student_dir(distilled, s) / "predictions_test.csv")
        ib, yb, pb = read_predictions(student_dir(alone, b) / "predictions_test.csv")
        order_a, order_b = np.argsort(ia), np.argsort(ib)
        if not np.array_equal(ia[order_a], ib[order_b]):
            raise ConfigError(f"the predictions of {s} and {b} cover other test images; re-evaluate both runs")
        arch = tuple(json.loads((student_dir(r, n) / "model.json").read_text())["arch"]
                     for r, n in ((distilled, s), (alone, b)))
        metrics = paired_bootstrap(pa[order_a], pb[order_b], ya[order_a], n_resamples, seed)
        out[s] = {"alone": b, "arch": list(arch), "n_images": int(len(ia)), "metrics": metrics,
                  "num_classes": int(pa.shape[1]),
                  "predicted_classes": {"distilled": predicted_classes(pa), "alone": predicted_classes(pb)},
                  **_gap(distilled, metrics["balanced_accuracy"])}
    return out


def gap_closed(distilled: float, alone: float, teacher: float) -> float | None:
    """The share of the teacher–student gap that distillation closed: (distilled − alone) /
    (teacher − alone); None where the teacher is not ahead of the student alone."""
    gap = teacher - alone
    return (distilled - alone) / gap if gap > 0 else None


def _gap(distilled: Path, bal: dict[str, Any]) -> dict[str, Any]:
    """The first teacher of the run (an ensemble counts as one) and the gap closed towards it."""
    try:
        summary = json.loads((distilled / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    teachers = [(n, r["test"]["balanced_accuracy"]) for n, r in summary.items() if r.get("role") == "teacher"]
    if not teachers:
        return {}
    name, t = teachers[0]
    return {"teacher": name, "teacher_balanced_accuracy": t, "gap_closed": gap_closed(bal["a"], bal["b"], t)}


def write_comparison(distilled: Path, alone: Path, n_resamples: int = 1000, seed: int = 0,
                     control: str = "alone") -> dict[str, Any]:
    """Compare, then store ``comparison.json`` in the distilled run (with the alone run's path,
    relative to it where it lies inside) and put the verdict at the top of its ``summary.md``.
    ``control="selftrain"``: the other run is the self-training control (``comparison_selftrain.json``,
    its verdict under the first); written first, so the alone verdict heads the file."""
    from medistill.io import write_json, write_text
    from medistill.rundir import portable_path

    res = compare_runs(distilled, alone, n_resamples, seed)
    record = {"alone_run": portable_path(str(alone), distilled), "resamples": n_resamples, "seed": seed,
              "control": control, "students": res}
    write_json(distilled / (COMPARISON_FILE if control == "alone" else SELFTRAIN_FILE), record)
    summary = distilled / "summary.md"
    body = summary.read_text() if summary.is_file() else ""
    while body.startswith(("**Did distillation help?**", "**Is it the teacher's knowledge?**")):
        body = body.split("\n\n---\n\n", 1)[1] if "\n\n---\n\n" in body else ""
    heads = [verdict_markdown(record)]
    if control == "alone" and (other := read_comparison(distilled, SELFTRAIN_FILE)) is not None:
        heads.append(verdict_markdown(other))
    write_text(summary, "\n\n---\n\n".join(heads) + "\n\n---\n\n" + body)
    return record


def read_comparison(run: str | Path, name: str = COMPARISON_FILE) -> dict[str, Any] | None:
    p = Path(run) / name
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _ci(m: dict[str, Any], digits: int = 3) -> str:
    lo, hi = m["ci95"]
    return f"{m['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def verdict_line(student: str, r: dict[str, Any]) -> str:
    """One sentence: the balanced-accuracy difference with its paired interval, and what it means."""
    m = r["metrics"]["balanced_accuracy"]
    lo, hi = m["ci95"]
    word = ("helped" if lo > 0 else "hurt" if hi < 0 else
            "made no difference that these test images can resolve")
    word += degenerate_caveat(r, word)
    others = ", ".join(f"{NAMES[k]} {_ci(v)}" for k, v in r["metrics"].items() if k != "balanced_accuracy")
    gap = ""
    if r.get("teacher") is not None:
        closed = r.get("gap_closed")
        gap = (f" Teacher {r['teacher']}: {r['teacher_balanced_accuracy']:.3f}; " +
               (f"gap closed {closed:.0%}." if closed is not None else "no gap to close (the teacher is not ahead)."))
    return (f"{student}: distillation {word} — balanced accuracy {m['b']:.3f} alone → {m['a']:.3f} distilled, "
            f"difference {_ci(m)} (paired bootstrap 95 % interval over the same {r['n_images']} test images); "
            f"{others}.{gap}")


def degenerate_caveat(r: dict[str, Any], word: str, share: float = 0.5) -> str:
    """The qualifier a verdict needs when an arm predicts one class or fewer than ``share`` of
    them: a difference against a broken baseline is not the teacher's doing."""
    pc, k = r.get("predicted_classes"), r.get("num_classes")
    if not pc or not k:
        return ""
    bad = [arm for arm in ("alone", "distilled") if degenerate(pc[arm], k, share)]
    if bad == ["alone"]:
        return (f" — but only against a degenerate baseline: the student alone predicts {pc['alone']} of {k} "
                "classes, so this measures a broken alone arm as much as the teacher")
    if bad == ["distilled"]:
        return f" — and the distilled student is degenerate: it predicts {pc['distilled']} of {k} classes"
    if bad:
        return (f" — both arms are degenerate ({pc['alone']} and {pc['distilled']} of {k} classes predicted): "
                "no verdict can be read from them; train longer or check the loss")
    return ""


def verdict_markdown(record: dict[str, Any]) -> str:
    if record.get("control") == "selftrain":
        lines = ["**Is it the teacher's knowledge?** Against the self-training control — the student trained alone, "
                 f"then distilled into a fresh student with the same method and unlabelled images ({record['alone_run']}):",
                 ""]
        lines += [f"- {verdict_line(s, r).replace('distillation ', 'the teacher ', 1).replace(' alone →', ' self-trained →')}"
                  for s, r in record["students"].items()]
        return "\n".join(lines)
    lines = [f"**Did distillation help?** Against the same student trained alone ({record['alone_run']}):", ""]
    lines += [f"- {verdict_line(s, r)}" for s, r in record["students"].items()]
    return "\n".join(lines)


def seed_differences(diffs: list[float]) -> str:
    """Over seeds: mean ± std of the per-seed differences (not a confidence interval)."""
    from medistill.eval.tables import mean_std_text

    n = len(diffs)
    return mean_std_text(diffs, signed=True) + (f" ({n} seed{'s' if n > 1 else ''})" if n else "")
