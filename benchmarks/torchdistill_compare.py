"""The KD and DKD rows of the RetinaMNIST table trained by torchdistill 1.1.5's DistillationBox
instead of medistill's engine: same data and split, same flip augmentation, same ResNet-50 teacher
checkpoint (from retinamnist_kd.py), same ResNet-18 student, AdamW 1e-3 / 5e-4, 1 warm-up epoch +
per-step cosine, batch 64, checkpoint chosen on validation balanced accuracy.

torchdistill 1.1.5 ships no DKD loss module: the DKD row registers medistill's ``dkd_loss`` as a
torchdistill mid-level loss, so it compares the training loops, not two DKD implementations.
torchdistill runs the teacher on every batch (no output cache); images/s is set against
medistill with the cache (its default) and without it.

    pip install torchdistill==1.1.5      # benchmark-only extra: pip install -e .[bench]
    python benchmarks/torchdistill_compare.py [--epochs 10] [--seeds 0]
    python benchmarks/torchdistill_compare.py --timing   # 1 epoch each, back to back, same threads

The accuracy runs may share the machine with other work; ``--timing`` measures images/s of
torchdistill KD and medistill KD (teacher live, and cached) in one process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torchdistill
from common import RESULTS, epoch_times, machine, save
from torch import nn
from torch.utils.data import Dataset
from torchdistill.core.distillation import DistillationBox
from torchdistill.losses.registry import register_mid_level_loss

from medistill.config import DataConfig
from medistill.data import build_data
from medistill.eval.metrics import classification_metrics
from medistill.losses import dkd_loss
from medistill.models.factory import (
    Preprocess,
    create_model,
    load_model_dir,
    resolve_norm,
)


class WithPre(nn.Module):
    """A medistill model with its preprocessing in front, as torchdistill expects one module."""

    def __init__(self, pre: nn.Module, model: nn.Module):
        super().__init__()
        self.pre, self.model = pre, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.pre(x))


class Pairs(Dataset):
    """medistill's training dataset (same images, same flip augmentation) as (x, y) pairs."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        x, y, _, _ = self.ds[k]
        return x, y


@register_mid_level_loss
class MedistillDKDLoss(nn.Module):
    """CE + DKD (α 1, β 8, τ 4) with DKD's linear warm-up over ``warmup_steps`` steps."""

    def __init__(self, warmup_steps: int, **kwargs):
        super().__init__()
        self.warmup_steps, self.step = warmup_steps, 0

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        zs, zt = student_io_dict["."]["output"], teacher_io_dict["."]["output"]
        self.step += 1
        ramp = min(self.step / self.warmup_steps, 1.0)
        return nn.functional.cross_entropy(zs, targets) + ramp * dkd_loss(zs, zt, targets, 1.0, 8.0, 4.0)


@torch.no_grad()
def probs_of(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    ps, ys = [], []
    for x, y, _, _ in loader:
        ps.append(model(x).softmax(1))
        ys.append(torch.as_tensor(y))
    model.train()
    return torch.cat(ps), torch.cat(ys)


def run_one(method: str, seed: int, epochs: int, teacher_dir: Path) -> dict:
    torch.manual_seed(seed)
    data = build_data(DataConfig(name="retinamnist", augment="flip"), role="student")
    t_model, t_pre, _ = load_model_dir(teacher_dir / "students" / "resnet50")
    teacher = WithPre(t_pre, t_model)
    size = data.source.native_size
    mean, std = resolve_norm("auto", False, data.channels)
    student = WithPre(Preprocess(data.channels, data.channels, size, tuple(mean), tuple(std)),
                      create_model("resnet18", data.num_classes, data.channels, size))
    n_train = len(data.splits["train"])
    steps = math.ceil(n_train / 64)
    total, warm = epochs * steps, steps
    if method == "kd":
        crit = {"key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                             "teacher_module_path": ".", "teacher_module_io": "output",
                                             "temperature": 4.0, "alpha": 0.1, "beta": 0.9, "reduction": "batchmean"}}
    else:
        crit = {"key": "MedistillDKDLoss", "kwargs": {"warmup_steps": warm}}
    train_config = {
        "num_epochs": epochs,
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": 64, "num_workers": 0}, "requires_supp": True},
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "forward_hook": {"input": [], "output": []},
                    "wrapper": None, "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [], "frozen_modules": [],
                    "forward_hook": {"input": [], "output": []},
                    "wrapper": None, "requires_grad": True},
        "optimizer": {"key": "AdamW", "kwargs": {"lr": 1e-3, "weight_decay": 5e-4}},
        "scheduler": {"key": "LambdaLR", "scheduling_step": 1, "kwargs": {
            "lr_lambda": lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min((s - warm) / max(1, total - warm), 1.0)))}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {method: {"criterion": crit, "weight": 1.0}}}},
    }
    box = DistillationBox(teacher, student, {"train": Pairs(data.dataset("train", train=True))}, train_config,
                          torch.device("cpu"), None, False, 1.0)
    val_loader = data.loader("val", 256, train=False)
    test_loader = data.loader("test", 256, train=False)
    best, best_state, times = -1.0, None, []
    for epoch in range(epochs):
        box.pre_epoch_process(epoch=epoch)
        t0 = time.perf_counter()
        for x, y, supp in box.train_data_loader:
            loss = box.forward_process(x, y, supp)
            box.post_forward_process(loss=loss)
        times.append(time.perf_counter() - t0)
        box.post_epoch_process()
        val = classification_metrics(*probs_of(student, val_loader))["balanced_accuracy"]
        print(f"torchdistill {method} seed {seed} epoch {epoch + 1}/{epochs}: val balanced_accuracy {val:.4f} "
              f"| {times[-1]:.1f}s", flush=True)
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(best_state)
    test = classification_metrics(*probs_of(student, test_loader))
    keep = ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "auroc", "ece")
    return {"test": {k: test[k] for k in keep}, "best_val_balanced_accuracy": best,
            "images_per_s": n_train / min(times), "epoch_s": min(times)}


def timing(root: Path) -> dict:
    """Images/s of one training epoch: torchdistill KD, medistill KD with the teacher live, and
    medistill KD with the teacher cache (cache already built), back to back in this process."""
    from common import run
    from retinamnist_kd import KD_TERMS, cfg

    out = {"machine": machine(), "torchdistill_kd": run_one("kd", 0, 1, root / "teacher_resnet50")["images_per_s"]}
    teacher = [{"name": "resnet50", "checkpoint": str(root / "teacher_resnet50")}]
    for mode in ("off", "on"):
        d = root / f"timing_medistill_kd_cache_{mode}"
        run(cfg(d, 1, 0, [{"name": "resnet18", "model": "resnet18"}], teacher, KD_TERMS, latency=False, teacher_cache=mode))
        n = len(json.loads((d / "split.json").read_text())["train"])
        out[f"medistill_kd_cache_{mode}"] = n / min(epoch_times(d))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--runs", default=str(RESULTS / "runs"))
    a = ap.parse_args()
    root = Path(a.runs)
    prev = RESULTS / "torchdistill.json"
    res = json.loads(prev.read_text()) if prev.is_file() else {"runs": {}}
    if a.timing:
        res["timing"] = timing(root)
        save("torchdistill", res)
        print(json.dumps(res["timing"], indent=2))
        return
    res.update(machine=machine(), torchdistill=torchdistill.__version__, epochs=a.epochs)
    for seed in a.seeds:
        for method in ("kd", "dkd"):
            key = f"{method}_s{seed}"
            if key not in res["runs"]:
                res["runs"][key] = run_one(method, seed, a.epochs, root / "teacher_resnet50")
                save("torchdistill", res)
    # medistill's images/s on the same work: KD with the teacher cache (fastest epoch over seeds) and without it
    split = json.loads((root / "kd_s0" / "split.json").read_text())
    n_train = len(split["train"])
    res["medistill_images_per_s"] = {
        "kd_cached": n_train / min(t for s in a.seeds for t in epoch_times(root / f"kd_s{s}")),
        "kd_teacher_live": n_train / min(epoch_times(root / "kd_nocache_timing")),
    }
    save("torchdistill", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
