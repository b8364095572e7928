"""Teacher cache build, like for like against older code (#33's "≥ 3× today's images/s").

    git worktree add /tmp/before 1b8861f     # the code before issue 33
    python benchmarks/cache_build.py --before /tmp/before --root /tmp/sc --images 600

The same build in each tree, alternated, ``--runs`` times: a ResNet-50 teacher (random weights;
timing does not depend on them) at 224 px over the training split of a folder of ``--images``
512-px JPEGs (made by benchmarks/scale.py's generator), ``data.augment=flip`` — the 2-view cache
the code before issue 33 could build — timed around ``make_teacher_caches`` in the run's own
process (``medistill distill``'s code path, stopped once the cache exists). Arms: ``before``
(the old tree, fp32), ``now`` (this tree's defaults: a folded teacher in its automatic
precision, bf16 on a CPU with bf16 units) and ``now_fp32`` (``train.teacher_amp=off``).
Results: results/cache_build.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed_build(src: str, args: list[str]) -> None:
    """In a child process: ``medistill distill ARGS`` from ``src``, timing the cache build."""
    import time

    sys.path.insert(0, src)
    import medistill.distill.engine as engine
    from medistill import cli

    orig = engine.make_teacher_caches

    def timed(*a, **k):
        t0 = time.perf_counter()
        caches = orig(*a, **k)
        print(json.dumps({"build_s": time.perf_counter() - t0, "cached": sorted(caches), "code": engine.__file__}),
              flush=True)
        os._exit(0)

    engine.make_teacher_caches = timed
    sys.argv = ["medistill", "distill", *args]
    cli.main()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a checkout of the older code (git worktree)")
    ap.add_argument("--root", default=None, help="where the JPEG folder goes (default: a temporary folder)")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--runs", type=int, default=2)
    if sys.argv[1:2] == ["--child"]:
        return timed_build(sys.argv[2], sys.argv[3:])
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import timm
    from safetensors.torch import save_file

    from common import machine, save
    from scale import CLASSES, make_pool, make_tree

    root = Path(a.root or tempfile.mkdtemp())
    tree = make_tree(root, make_pool(root, a.images), a.images)
    w = root / "resnet50.safetensors"
    if not w.exists():
        save_file(timm.create_model("resnet50", num_classes=CLASSES).state_dict(), str(w))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    arms = {"before": (str(Path(a.before) / "src"), []),
            "now": (str(HERE.parent / "src"), []),
            "now_fp32": (str(HERE.parent / "src"), ["--set", "train.teacher_amp=off"])}
    rows = []
    for r in range(a.runs):
        for arm, (src, extra) in (arms.items() if r % 2 == 0 else reversed(arms.items())):
            out, cache = root / f"cb_{arm}", root / f"cb_cache_{arm}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            args = ["--data", str(tree), "--model", "mobilenetv3_small_100", "--input-size", "224", "--epochs", "1",
                    "--teacher", f"resnet50={w}", "--method", "kd", "--set", "teachers.0.input_size=224",
                    "--set", "data.augment=flip", "--set", "train.teacher_cache=on", "--set", "train.latency=false",
                    "--set", f"train.cache_dir={cache}", "--out", str(out), *extra]
            p = subprocess.run([sys.executable, __file__, "--child", src, *args], capture_output=True,
                               text=True, env={**env, "PYTHONPATH": src})
            if p.returncode or not p.stdout.strip():
                raise RuntimeError(p.stderr[-3000:])
            res = json.loads(p.stdout.strip().splitlines()[-1])
            if not res["code"].startswith(src) or not res["cached"]:   # the tree asked for, and a cache built
                raise RuntimeError(f"{arm}: ran {res['code']}, cached {res['cached']}")
            train = int(round(a.images * 0.7))   # the default 70/10/20 split
            row = {"arm": arm, "run": r, "build_s": round(res["build_s"], 1),
                   "images_per_s": round(train / res["build_s"], 2), "train_images": train}
            rows.append(row)
            print(row, flush=True)
    save("cache_build", {"machine": machine(), "rows": rows,
                         "command": "python benchmarks/cache_build.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
