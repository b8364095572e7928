"""Epoch time of the standard per-image DataLoader against ``data.resident`` (the whole
``.npz`` on the training device, batches gathered and augmented there), interleaved in one
process so both see the same machine load.

    python benchmarks/resident_loader.py                       # cnn5 at 32 px on isic8_64, CPU
    python benchmarks/resident_loader.py --device cuda --model resnet18 --input-size 64

Results: ``benchmarks/results/resident_loader.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent


def one_epoch(resident: bool, a: argparse.Namespace, out: Path) -> float:
    from medistill.config import load_config
    from medistill.distill.engine import Engine

    cfg = load_config(None, [], base={
        "data": {"name": a.data, "augment": "dihedral", "resident": "on" if resident else "off", "num_workers": a.workers if not resident else 0},
        "students": [{"name": "s", "model": a.model, "input_size": a.input_size}],
        "train": {"epochs": 1, "batch_size": a.batch_size, "threads": a.threads, "progress": False, "latency": False,
                  "device": a.device},
        "eval": {"bootstrap": 0}, "out": str(out)})
    Engine(cfg).run()
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["train_time_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(os.environ.get("MEDISTILL_DATA_DIR", REPO.parent / "shared" / "data")) / "isic8_64.npz"))
    ap.add_argument("--model", default="cnn5")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    times: dict[str, list[float]] = {"standard": [], "resident": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for name in ("standard", "resident"):
                times[name].append(one_epoch(name == "resident", a, Path(tmp) / f"{name}-{r}"))
    std, res = statistics.median(times["standard"]), statistics.median(times["resident"])
    result = {"command": "python benchmarks/resident_loader.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "data"),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "times": times, "standard_s": std, "resident_s": res, "speedup": std / res}
    (ROOT / "results").mkdir(exist_ok=True)
    tag = f"{a.device.split(':')[0]}-{a.model}-{a.input_size}" + (f"-workers{a.workers}" if a.workers else "")
    (ROOT / "results" / f"resident_loader-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{a.model} @{a.input_size}px on {a.device}: standard {std:.1f} s/epoch, resident {res:.1f} s/epoch, "
          f"speed-up {std / res:.2f}× (median of {a.repeats})")


if __name__ == "__main__":
    main()
