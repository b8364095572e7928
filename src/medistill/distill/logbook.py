"""What a run records per epoch: one ``metrics.jsonl`` line (every loss term, diagnostic, learning
rate, timing), TensorBoard scalars and the console line."""

from __future__ import annotations

from pathlib import Path
from typing import Any


from medistill.eval.metrics import selection_score
from medistill.io import append_jsonl


class EpochLog:
    """``metrics.jsonl`` and TensorBoard (``tb/``) of one run directory; rank 0 only."""

    def __init__(self, out: Path):
        self.out, self.path = out, out / "metrics.jsonl"
        self._tb: Any = None

    @property
    def tb(self) -> Any:
        """The TensorBoard writer, made at the first epoch's end: importing TensorBoard takes 0.08 s
        that would otherwise stand between the start and the first training step."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tb"))
        return self._tb

    def write(self, epoch: int, lr: dict[str, float], train: dict[str, dict[str, float]], val: dict[str, dict[str, Any]],
              diagnostics: dict[str, dict[str, Any]], train_time: float, n_images: int,
              unlabeled: dict[str, Any] | None = None) -> None:
        """``n_images``: labelled training images of the epoch; ``unlabeled``: the unlabelled images
        drawn (``seen``), the pool's size and their ratio (``share``; above 1 when drawn twice)."""
        if unlabeled:
            unlabeled = {**unlabeled, "share": round(unlabeled["seen"] / max(1, unlabeled["pool"]), 4)}
        n = n_images + (unlabeled["seen"] if unlabeled else 0)
        append_jsonl(self.path, {"epoch": epoch, "lr": lr, "train": train, "val": val, "diagnostics": diagnostics,
                                 "train_time_s": round(train_time, 3), "images_per_s": round(n / max(train_time, 1e-9), 2),
                                 **({"unlabeled": unlabeled} if unlabeled else {})})
        for s, d in train.items():
            for k, v in d.items():
                self.tb.add_scalar(f"train/{s}/{k}", v, epoch)
        for s, d in val.items():
            for k, v in d.items():
                if v is not None:
                    self.tb.add_scalar(f"val/{s}/{k}", v, epoch)
        self.tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def epoch_line(epoch: int, epochs: int, train: dict[str, dict[str, float]], val: dict[str, dict[str, Any]],
               metric: str, train_time: float) -> str:
    """The console summary of one epoch: each student's loss and validation score."""
    return f"epoch {epoch + 1}/{epochs} " + " | ".join(
        f"{s}: loss {train[s]['loss']:.4f} val {metric} {selection_score(val[s], metric):.4f}" for s in train
    ) + f" | {train_time:.1f}s"
