"""Student latency on CPU, PyTorch vs ONNX Runtime, batch 1 and 64 (ResNet-18, MobileNetV2 and
cnn5 students at 28 px), plus export max |difference|.

    python benchmarks/deploy_bench.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine, save
from medistill.commands.deploy import Deployable
from medistill.models import create_model
from medistill.models.factory import Preprocess


def median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    import onnxruntime as ort

    rows = []
    for arch in ("resnet18", "mobilenetv2_100", "cnn5"):
        net = Deployable(Preprocess(3, 3, 28, (0.5,) * 3, (0.5,) * 3), create_model(arch, 5, 3, 28)).eval()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "m.onnx"
            torch.onnx.export(net, (torch.rand(1, 3, 28, 28),), str(path), dynamo=False, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
            so = ort.SessionOptions()
            so.intra_op_num_threads = torch.get_num_threads()
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            for b in (1, 64):
                x = torch.rand(b, 3, 28, 28)
                with torch.inference_mode():
                    t_pt = median_ms(lambda: net(x), 20 if b == 1 else 5)
                    ref = net(x).numpy()
                xn = x.numpy()
                t_ort = median_ms(lambda: sess.run(None, {"images": xn}), 20 if b == 1 else 5)
                diff = float(np.abs(sess.run(None, {"images": xn})[0] - ref).max())
                rows.append({"model": arch, "batch": b, "pytorch_ms": round(t_pt, 2), "onnxruntime_ms": round(t_ort, 2),
                             "speedup_ort": round(t_pt / t_ort, 2), "max_abs_diff": diff})
                print(rows[-1], flush=True)
    save("deploy", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
