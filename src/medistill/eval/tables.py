"""Markdown tables of run results."""

from __future__ import annotations

from typing import Any


def mean_std_text(values: list[float], signed: bool = False) -> str:
    """``0.512 ± 0.010`` over runs (one value alone, ``–`` for none); ``signed`` for differences."""
    import statistics

    fmt = "{:+.3f}" if signed else "{:.3f}"
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return fmt.format(statistics.mean(values)) + f" ± {statistics.stdev(values):.3f}"


def with_ci(metrics: dict[str, Any], key: str, digits: int = 3) -> str:
    """``0.512 (0.480–0.545)``: the value and, when ``metrics`` has one, its bootstrap 95 % interval."""
    v = metrics.get(key)
    if v is None:
        return "–"
    ci = (metrics.get("ci95") or {}).get(key)
    return f"{v:.{digits}f}" + (f" ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else "")


# The roles of trained models in ``summary.json``: "trained alone" where the run had no teacher
# (runs before 2026-11-27 stored "student" there too; role_label reads those).
STUDENT_ROLES = ("student", "trained alone")


def role_label(role: str, rows: dict[str, Any], row: dict[str, Any] | None = None) -> str:
    """A run without teachers trained its model alone: "student" would mislabel a teacher run. A
    teacher trained on some of these test images is marked: its numbers are optimistic."""
    if role == "student" and not any(r.get("role") == "teacher" for r in rows.values()):
        return "trained alone"
    if row and row.get("trained_on_test_images"):
        return f"{role} (trained on {row['trained_on_test_images']} of these test images: optimistic)"
    return role


CI_NOTE = "Brackets: stratified bootstrap 95 % interval over the test images ({n} resamples)."


def summary_table(rows: dict[str, Any], share: float = 0.5) -> str:
    """Markdown table of every model's test metrics, with bootstrap intervals where computed;
    QWK only for ordinal data; a warning under it for each degenerate model (``share``:
    ``eval.degenerate_share``)."""
    keys = ["accuracy", "balanced_accuracy", "macro_f1", "qwk", "auroc", "ece"]
    if all(r["test"].get("qwk") is None for r in rows.values()):
        keys.remove("qwk")
    names = {"accuracy": "ACC", "balanced_accuracy": "bal. ACC", "macro_f1": "macro-F1", "qwk": "QWK", "auroc": "AUROC", "ece": "ECE"}
    head = "| model | role | params (M) | MFLOPs | " + " | ".join(names[k] for k in keys) + " |\n|" + "---|" * (4 + len(keys)) + "\n"
    lines = []
    for name, r in rows.items():
        t = r["test"]
        lines.append(f"| {name} | {role_label(r['role'], rows, r)} | {r['model']['params'] / 1e6:.2f} | {r['model']['flops'] / 1e6:.1f} | "
                     + " | ".join(with_ci(t, k) for k in keys) + " |")
    n = next((r["test"]["ci95"].get("resamples") for r in rows.values() if r["test"].get("ci95")), None)
    notes = degenerate_notes(rows, share)
    return head + "\n".join(lines) + "\n" + (f"\n{CI_NOTE.format(n=n)}\n" if n else "") + \
        ("\n" + "\n".join(f"- **Warning:** {t}" for t in notes) + "\n" if notes else "")


def degenerate_notes(rows: dict[str, Any], share: float = 0.5) -> list[str]:
    """One sentence per model whose test predictions cover one class or fewer than ``share`` of
    the classes (from its confusion matrix)."""
    from medistill.eval.metrics import degenerate, predicted_from_confusion

    out = []
    for name, r in rows.items():
        cm = r["test"].get("confusion_matrix")
        if not cm:
            continue
        n, k = predicted_from_confusion(cm), len(cm)
        if degenerate(n, k, share):
            out.append(f"{name} predicts {n} of {k} classes on these test images: degenerate (its balanced accuracy "
                       "cannot rise far above chance); compare against it with care")
    return out
