"""Peak resident memory (RSS) of UMKD and dual-student distillation steps at 28 px (RetinaMNIST,
batch 64) and 224 px (LC25000, batch 16), each in a fresh process; KD for reference. Teachers
are randomly initialised (memory does not depend on their weights).

    python benchmarks/memory_bench.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, save

CHILD = r"""
import json, resource, sys
from medistill.config import load_config
from medistill.distill.engine import Engine
cfg = json.loads(sys.argv[1])
Engine(load_config(None, [], base=cfg)).run()
print("RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_teacher(d: Path, arch: str, size: int, classes: int, data_chans: int = 3) -> str:
    from medistill.models import ModelSpecRecord, save_model_dir

    spec = ModelSpecRecord(arch, classes, 3, data_chans, size, "auto", [0.5] * 3, [0.5] * 3, [str(i) for i in range(classes)])
    m, _ = spec.build()
    save_model_dir(d, m, spec)
    return str(d)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size, data, classes, batch in ((28, "retinamnist", 5, 64), (224, "lc25000-lung", 3, 16)):
            e0 = make_teacher(tmp / f"e0_{size}", "resnet50", size, classes)
            e1 = make_teacher(tmp / f"e1_{size}", "resnet50", size, classes)
            base = {"data": {"name": data, "augment": "flip", "subset": {"max_samples": 3 * batch}, "max_eval_samples": 32},
                    "train": {"epochs": 1, "batch_size": batch, "latency": False, "progress": False, "teacher_cache": "off"}}
            cases = {
                "kd (1 teacher)": {"teachers": [{"name": "t", "checkpoint": e0}], "students": [{"name": "s", "model": "resnet18", "input_size": size}],
                                   "terms": [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9}]},
                "umkd (2 experts)": {"teachers": [{"name": "e0", "checkpoint": e0}, {"name": "e1", "checkpoint": e1}],
                                     "students": [{"name": "s", "model": "resnet18", "input_size": size}],
                                     "terms": [{"type": "ce"}, {"type": "sfa", "weight": 10}, {"type": "cfa", "weight": 10}, {"type": "udd"}]},
                "dual-student": {"teachers": [{"name": "t", "checkpoint": e0}],
                                 "students": [{"name": "r18", "model": "resnet18", "input_size": size},
                                              {"name": "mv2", "model": "mobilenetv2_100", "input_size": size}],
                                 "terms": [{"type": "ce", "weight": 0.4}, {"type": "kd", "weight": 0.4, "sample_weight": "entropy"},
                                           {"type": "peer", "weight": 0.2, "temperature": 4.0}]},
            }
            for name, c in cases.items():
                cfg = {**base, **c, "out": str(tmp / f"{name.split()[0]}_{size}")}
                p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
                rss = next((int(ln.split()[1]) for ln in p.stdout.splitlines() if ln.startswith("RSS_KB")), None)
                rows.append({"method": name, "input": size, "batch": batch,
                             "peak_rss_mb": round(rss / 1024, 1) if rss else None,
                             "error": None if p.returncode == 0 else p.stderr[-300:]})
                print(rows[-1], flush=True)
    save("memory", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
