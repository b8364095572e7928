"""Training images/s at 28 px: resnet18, resnet50, mobilenetv2_100 × fp32/bf16 × channels_last.

    python benchmarks/throughput.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from common import machine, save
from medistill.models import create_model


def measure(name: str, bf16: bool, cl: bool, batch: int = 64, steps: int = 4) -> float:
    torch.manual_seed(0)
    m = create_model(name, 5, 3, 28)
    if cl:
        m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x, y = torch.randn(batch, 3, 28, 28), torch.randint(0, 5, (batch,))
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(m(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return batch / (sum(times) / len(times))


def main() -> None:
    rows = []
    for name in ("resnet18", "resnet50", "mobilenetv2_100"):
        for bf16 in (False, True):
            for cl in (False, True):
                ips = measure(name, bf16, cl, steps=2 if (bf16 and name == "resnet50") else 4)
                rows.append({"model": name, "bf16": bf16, "channels_last": cl, "images_per_s": round(ips, 1)})
                print(rows[-1], flush=True)
    save("throughput", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
