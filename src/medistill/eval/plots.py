"""Matplotlib figures (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medistill.io import atomic_path  # noqa: E402


def save_confusion_png(cm: list[list[int]], class_names: list[str] | None, path: str | Path) -> None:
    m = np.asarray(cm, dtype=float)
    c = m.shape[0]
    names = class_names or [str(i) for i in range(c)]
    row = m / np.clip(m.sum(1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * c, 1.0 + 0.7 * c))
    ax.imshow(row, cmap="Blues", vmin=0, vmax=1)
    for i in range(c):
        for j in range(c):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color="white" if row[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(c), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(c), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (row-normalised colour)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
