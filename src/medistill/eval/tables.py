"""Markdown tables of run results."""

from __future__ import annotations

from typing import Any


def summary_table(rows: dict[str, Any]) -> str:
    """Markdown table of every model's test metrics; QWK only for ordinal data."""
    keys = ["accuracy", "balanced_accuracy", "macro_f1", "qwk", "auroc", "ece"]
    if all(r["test"].get("qwk") is None for r in rows.values()):
        keys.remove("qwk")
    names = {"accuracy": "ACC", "balanced_accuracy": "bal. ACC", "macro_f1": "macro-F1", "qwk": "QWK", "auroc": "AUROC", "ece": "ECE"}
    head = "| model | role | params (M) | MFLOPs | " + " | ".join(names[k] for k in keys) + " |\n|" + "---|" * (4 + len(keys)) + "\n"
    lines = []
    for name, r in rows.items():
        t = r["test"]
        lines.append(f"| {name} | {r['role']} | {r['model']['params'] / 1e6:.2f} | {r['model']['flops'] / 1e6:.1f} | "
                     + " | ".join("–" if t.get(k) is None else f"{t[k]:.3f}" for k in keys) + " |")
    return head + "\n".join(lines) + "\n"
