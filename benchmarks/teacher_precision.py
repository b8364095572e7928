"""A frozen teacher's precision and folded BatchNorms (#33): what they gain, what they change.

    python benchmarks/teacher_precision.py --epochs 8

1. Speed: ResNet-50 (random weights; speed does not depend on them) at 224 px, batch 32,
   channels-last, inference mode: images/s in fp32, fp32 with BatchNorm folded, bf16 autocast,
   and bf16 folded (a frozen teacher's default on a CPU or GPU that computes bf16 natively).
2. Fidelity: a ResNet-18 teacher trained on isic8_64 (``--epochs``, seed 0, 64 px) — its
   validation and test logits in plain fp32 (the reference) against folded fp32 and folded bf16:
   the largest |Δ logit| over the logits' standard deviation, KL(p_fp32 ‖ p_other) at T=4 (the
   KD temperature) and T=1, top-1 agreement, and balanced accuracy of each.
Results: results/teacher_precision.json; the table goes into docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine, run, save
from medistill.config import DataConfig
from medistill.data.dataset import build_data
from medistill.device import autocast, native_bf16
from medistill.eval.metrics import classification_metrics
from medistill.models.fold import fold_batchnorm
from medistill.models.saved import load_student

CPU = torch.device("cpu")


def speed(batch: int = 32, reps: int = 4) -> dict[str, float]:
    import timm

    base = timm.create_model("resnet50", num_classes=4).eval()
    folded = copy.deepcopy(base)
    n = fold_batchnorm(folded)
    x = torch.rand(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    out = {"batchnorms_folded": n}
    for name, model, amp in (("fp32", base, "off"), ("fp32_folded", folded, "off"), ("bf16", base, "bf16"),
                             ("bf16_folded", folded, "bf16")):
        model = model.to(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(CPU, amp):
            model(x)   # warm-up: oneDNN picks and caches its kernels
            t0 = time.perf_counter()
            for _ in range(reps):
                model(x)
        out[name] = round(batch * reps / (time.perf_counter() - t0), 1)
        print(name, out[name], "images/s", flush=True)
    return out


def outputs(student, loader, amp: str) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = [], []
    with torch.inference_mode(), autocast(CPU, amp):
        for x, y, _, _ in loader:
            logits.append(student(x).float())
            labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(labels)


def fidelity(epochs: int, work: Path) -> dict:
    data_dir = Path(os.environ.get("MEDISTILL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    npz = data_dir / "isic8_64.npz"
    out = work / "teacher_r18"
    summary = run({"data": {"name": str(npz), "augment": "flip"},
                   "students": [{"name": "student", "model": "resnet18"}],
                   "optim": {"name": "adamw", "lr": 1e-3},
                   "train": {"epochs": epochs, "batch_size": 64, "seed": 0, "latency": False, "progress": False},
                   "out": str(out)})
    data = build_data(DataConfig(name=str(npz)))
    ref_model = load_student(out / "students" / "student")
    folded = copy.deepcopy(ref_model)
    n = fold_batchnorm(folded)
    res: dict = {"teacher": "resnet18 on isic8_64, 64 px", "epochs": epochs, "batchnorms_folded": n,
                 "teacher_test_balanced_accuracy_in_run": summary["student"]["test"]["balanced_accuracy"]}
    loader = torch.utils.data.ConcatDataset([data.dataset("val", False), data.dataset("test", False)])
    loader = torch.utils.data.DataLoader(loader, batch_size=128)
    ref, y = outputs(ref_model, loader, "off")
    res["images"] = len(y)
    for name, model, amp in (("fp32_folded", folded, "off"), ("bf16_folded", folded, "bf16")):
        got, _ = outputs(model, loader, amp)
        row = {"max_abs_dlogit_over_logit_std": float((got - ref).abs().max() / ref.std()),
               "top1_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean())}
        for t in (4.0, 1.0):
            kl = F.kl_div(F.log_softmax(got / t, 1), F.log_softmax(ref / t, 1), log_target=True, reduction="batchmean")
            row[f"kl_T{t:g}"] = float(kl)
        row["balanced_accuracy"] = classification_metrics(got.softmax(1), y)["balanced_accuracy"]
        res[name] = row
        print(name, row, flush=True)
    res["fp32_balanced_accuracy"] = classification_metrics(ref.softmax(1), y)["balanced_accuracy"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--work", default="/tmp/medistill_teacher_precision")
    a = ap.parse_args()
    res = {"machine": machine(), "native_bf16": native_bf16(CPU), "speed_resnet50_224": speed(),
           "fidelity": fidelity(a.epochs, Path(a.work)),
           "command": f"python benchmarks/teacher_precision.py --epochs {a.epochs}"}
    save("teacher_precision", res)


if __name__ == "__main__":
    main()
