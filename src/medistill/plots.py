"""Every matplotlib figure of medistill, in one place (Agg backend: no display needed).

Figures are built by ``*_figure`` functions and written by :func:`save_png` (atomically, to a
file) or :func:`png_data_uri` (embedded in the self-contained HTML reports)."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medistill.io import atomic_path  # noqa: E402

Figure = plt.Figure


def save_png(fig: Figure, path: str | Path, dpi: int = 110) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def png_data_uri(fig: Figure, dpi: int = 100) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def confusion_figure(cm: list[list[int]], class_names: list[str] | None, title: str = "confusion (row-normalised colour)") -> Figure:
    """Counts in the cells, colour by row-normalised rate (rows = true classes)."""
    m = np.asarray(cm, dtype=float)
    c = m.shape[0]
    names = class_names or [str(i) for i in range(c)]
    row = m / np.clip(m.sum(1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * c, 1.0 + 0.6 * c))
    ax.imshow(row, cmap="Blues", vmin=0, vmax=1)
    for i in range(c):
        for j in range(c):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color="white" if row[i, j] > 0.5 else "black", fontsize=7)
    ax.set_xticks(range(c), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(c), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def curves_figure(log: list[dict[str, Any]]) -> Figure:
    """Training loss terms (epoch means) and validation metrics from ``metrics.jsonl`` records."""
    students = sorted({s for r in log for s in r["train"]})
    terms = sorted({k for r in log for s in r["train"].values() for k in s})
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    ep = [r["epoch"] + 1 for r in log]
    for s in students:
        for k in terms:
            ys = [r["train"].get(s, {}).get(k) for r in log]
            if any(y is not None for y in ys):
                axes[0].plot(ep, ys, marker=".", label=f"{s}: {k}")
        axes[1].plot(ep, [r["val"][s]["balanced_accuracy"] for r in log], marker="o", label=f"{s} bal. acc")
        if all(r["val"][s].get("qwk") is not None for r in log):   # ordinal data only
            axes[1].plot(ep, [r["val"][s]["qwk"] for r in log], marker="x", ls="--", label=f"{s} QWK")
    axes[0].set_title("training loss terms (epoch means)")
    axes[0].set_yscale("symlog", linthresh=1e-2)
    axes[1].set_title("validation")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    return fig


def recall_figure(models: dict[str, dict[str, Any]], names: list[str]) -> Figure:
    """Per-class test recall of several models side by side."""
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) * max(1, len(models)) / 2), 3.2))
    width = 0.8 / max(1, len(models))
    for k, (n, m) in enumerate(models.items()):
        rec = [np.nan if v is None else v for v in m["test"]["per_class_recall"]]
        ax.bar(np.arange(len(rec)) + k * width, rec, width, label=n)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test recall")
    ax.legend(fontsize=7)
    ax.set_title("per-class recall (test)")
    return fig


def reliability_figure(pred_csv: Path, title: str, bins: int = 15) -> Figure:
    """Top-label reliability diagram from a ``predictions_*.csv`` (marker size ∝ bin count)."""
    with open(pred_csv) as fh:
        rows = list(csv.DictReader(fh))
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    acc, mid, cnt = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            acc.append((pred[m] == y[m]).mean())
            mid.append(conf[m].mean())
            cnt.append(m.sum())
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.scatter(mid, acc, s=[10 + 200 * c / max(cnt) for c in cnt])
    ax.plot(mid, acc)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    return fig


def overlay_figure(images: np.ndarray, columns: dict[str, np.ndarray], labels: list[str]) -> Figure:
    """A grid: each row an image ``[H, W, C]`` and its maps (``columns[name][i]`` in [0, 1]) over it."""
    n, k = len(images), len(columns) + 1
    fig, axes = plt.subplots(n, k, figsize=(1.6 * k, 1.6 * n), squeeze=False)
    for i in range(n):
        img = images[i]
        axes[i, 0].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
        axes[i, 0].set_ylabel(labels[i], fontsize=7)
        for j, (name, maps) in enumerate(columns.items(), start=1):
            axes[i, j].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
            axes[i, j].imshow(maps[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if i == 0:
                axes[i, j].set_title(name, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
