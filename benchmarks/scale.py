"""A clinic's scale (#33): class folders of 512-px JPEGs trained at 224 px, medistill against a
plain PyTorch loop (torchvision ``ImageFolder`` + ``DataLoader(num_workers=2)`` + timm), and a
KD epoch with a ResNet-50 teacher against a student-only epoch.

    python benchmarks/scale.py --sizes 1000 4000 16000 --runs 3 --steps 20 --kd-images 600

Per N (images in the folder tree; 4 classes) and run, the two loops run alternately as
separate processes, MobileNetV3-Small, batch 64, 224 px, torch's default threads:
- startup: process start → first training step (imports, folder scan, split, checks, model);
- images/s: steps 2..S (the first step's wait is startup);
- peak memory: the process and its workers together (summed PSS), sampled every 0.1 s in a
  separate, shorter run of the same loop (``--memory-steps``): the sampler costs CPU;
- disk: what the run wrote (run directory, caches); the plain loop writes nothing.
medistill runs as ``medistill train`` would (the CLI's code path in this process), with its
default loader settings; the training step is wrapped only to time it and stop after S steps.

KD: a ResNet-50 (random weights; timing does not depend on them) saved as a weights file and
given as ``--teacher resnet50=FILE`` at 224 px; one full epoch over ``--kd-images`` images,
student-only vs KD (default augmentation, teacher cache auto → fixed crops; the teacher live, in
its default precision and in fp32), and the cache
build's images/s, from the runs' ``metrics.jsonl`` and the build's own timing.
Results: results/scale.json; the table is written into docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLASSES = 4


def make_pool(root: Path, n: int, size: int = 512) -> Path:
    """``n`` JPEGs (smooth random colour fields with a class-dependent stripe), generated once."""
    from PIL import Image

    pool = root / "pool"
    have = len(list(pool.glob("*.jpg"))) if pool.exists() else 0
    pool.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(have)
    for i in range(have, n):
        c = i % CLASSES
        small = rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
        small[4 * c:4 * c + 4] = 240
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(pool / f"{i:06d}_{c}.jpg", quality=90)
    return pool


def make_tree(root: Path, pool: Path, n: int) -> Path:
    """Class folders holding the first ``n`` pool images (hard links: no copies on disk)."""
    tree = root / f"n{n}"
    if tree.exists():
        return tree
    for i in range(n):
        src = pool / f"{i:06d}_{i % CLASSES}.jpg"
        d = tree / f"class{i % CLASSES}"
        d.mkdir(parents=True, exist_ok=True)
        os.link(src, d / src.name)
    return tree


def tree_rss_kb(pid: int) -> int:
    """Memory of ``pid`` and all its descendants (kB): the sum of their proportional set sizes
    (``Pss`` in /proc/PID/smaps_rollup — pages shared by forked workers counted once, not once
    per process as summed RSS would). Descendants come from each thread's ``children`` list:
    reading every process's ``stat`` 10 times a second took a third of a core from the loops
    being measured."""
    total, todo = 0, [pid]
    while todo:
        q = todo.pop()
        try:
            for line in Path(f"/proc/{q}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{q}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return total


def measured(cmd: list[str], env: dict[str, str], sample: bool) -> dict:
    """Run ``cmd``; its last stdout line is JSON. With ``sample``, add the peak memory (MB) of its
    process tree, read every 0.1 s. Reading ``smaps_rollup`` walks the page tables of each 2 GB
    process (and takes its memory-map lock): about a third of a core on 2 cores, which slowed the
    loops being timed, so images/s and startup come from runs without the sampler."""
    t0 = time.time()
    # its own process group: the loops stop with os._exit, and their loader workers notice a
    # dead parent only at their next 5 s check, decoding on meanwhile; left alone they took CPU
    # from the next run's startup and first steps, so the group is killed and awaited below
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    peak = [0]

    def watch() -> None:
        while p.poll() is None:
            peak[0] = max(peak[0], tree_rss_kb(p.pid))
            time.sleep(0.1)

    th = threading.Thread(target=watch, daemon=True)
    if sample:
        th.start()
    out, err = p.communicate()
    if sample:
        th.join()
    reap_group(p.pid)
    if p.returncode != 0 or not out.strip():
        raise RuntimeError(f"{cmd[:4]} failed ({p.returncode}):\n{err[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["startup_s"] = round(res.pop("first_step_t") - t0, 2)
    if sample:
        res["peak_rss_mb"] = round(peak[0] / 1024, 1)
    return res


def reap_group(pgid: int) -> None:
    """Kill what is left of process group ``pgid`` (orphaned loader workers) and wait until it is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


# ----------------------------------------------------------------------------- the two loops
def plain_loop(data: str, steps: int, workers: int) -> None:
    """The reference: what a PyTorch user writes first."""
    import timm
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms as T

    tf = T.Compose([T.RandomResizedCrop(224, scale=(0.8, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = datasets.ImageFolder(data, tf)
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    model = timm.create_model("mobilenetv3_small_100", num_classes=len(ds.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    times = []
    for i, (x, y) in enumerate(loader):
        times.append(time.time())
        if i == steps:
            break
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(json.dumps({"first_step_t": times[0], "images_per_s": round(64 * (len(times) - 2) / (times[-1] - times[1]), 1)}))
    os._exit(0)


def medistill_loop(data: str, steps: int, out: str, extra: list[str]) -> None:
    """``medistill train DATA --model mobilenetv3_small_100 --input-size 224 --batch-size 64``,
    the step timed and the run stopped after ``steps`` steps."""
    from medistill import cli
    from medistill.distill.engine import Engine

    times: list[float] = []
    orig = Engine._step

    def timed(self, batch, epoch, step):   # the batch has arrived: a step starts
        times.append(time.time())
        if len(times) == steps + 1:
            print(json.dumps({"first_step_t": times[0],
                              "images_per_s": round(64 * (len(times) - 2) / (times[-1] - times[1]), 1)}), flush=True)
            os._exit(0)
        return orig(self, batch, epoch, step)

    Engine._step = timed
    sys.argv = ["medistill", "train", "--data", data, "--model", "mobilenetv3_small_100", "--input-size", "224",
                "--batch-size", "64", "--epochs", "1", "--out", out, *extra]
    cli.main()


def disk_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2) if path.exists() else 0.0


# ----------------------------------------------------------------------------- KD epoch
def kd_epochs(root: Path, pool: Path, n: int, env: dict[str, str]) -> dict:
    """One epoch of student-only and of KD (ResNet-50 teacher at 224, default augmentation) over
    ``n`` images; the cache build's own images/s."""
    import timm
    from safetensors.torch import save_file

    tree = make_tree(root, pool, n)
    w = root / "resnet50.safetensors"
    if not w.exists():
        save_file(timm.create_model("resnet50", num_classes=CLASSES).state_dict(), str(w))
    res = {}
    common = ["--data", str(tree), "--model", "mobilenetv3_small_100", "--input-size", "224", "--batch-size", "64",
              "--epochs", "2", "--set", "train.latency=false"]
    for name, args in (("student_only", ["train"]),
                       ("kd_cached", ["distill", "--teacher", f"resnet50={w}", "--method", "kd",
                                      "--set", "teachers.0.input_size=224"]),
                       ("kd_live", ["distill", "--teacher", f"resnet50={w}", "--method", "kd",
                                    "--set", "teachers.0.input_size=224", "--set", "train.teacher_cache=off"]),
                       ("kd_live_fp32", ["distill", "--teacher", f"resnet50={w}", "--method", "kd",
                                         "--set", "teachers.0.input_size=224", "--set", "train.teacher_cache=off",
                                         "--set", "train.teacher_amp=off"])):
        out = root / f"kd_{name}"
        shutil.rmtree(out, ignore_errors=True)
        cache = root / f"cache_{name}"
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "medistill.cli", *args[:1], *common, *args[1:], "--out", str(out)],
                           capture_output=True, text=True, env={**env, "MEDISTILL_CACHE_DIR": str(cache)})
        if p.returncode:
            raise RuntimeError(p.stderr[-3000:])
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        res[name] = {"epoch_s": [r["train_time_s"] for r in recs], "wall_s": round(time.time() - t0, 1),
                     "train_images": int(round(recs[0]["images_per_s"] * recs[0]["train_time_s"]))}
        flat = " ".join(p.stderr.split())   # the console wraps long lines
        m = re.search(r"teacher cache built: .*?\((\d+) images × (\d+) view\(s\) in ([\d.]+) s, ([\d.]+) images/s\)", flat)
        if m:
            res[name]["cache_build"] = {"images": int(m[1]), "views": int(m[2]), "seconds": float(m[3]),
                                        "images_per_s": float(m[4])}
        res[name]["cache_mb"] = disk_mb(cache)
    so = min(res["student_only"]["epoch_s"])
    res["ratio_kd_cached"] = round(min(res["kd_cached"]["epoch_s"]) / so, 2)
    res["ratio_kd_live"] = round(min(res["kd_live"]["epoch_s"]) / so, 2)
    res["ratio_kd_live_fp32"] = round(min(res["kd_live_fp32"]["epoch_s"]) / so, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (fewer where one epoch is shorter)")
    ap.add_argument("--memory-steps", type=int, default=6, help="steps of the separate memory-sampled run")
    ap.add_argument("--kd-images", type=int, default=600, help="images in the KD epoch comparison (0: skip it)")
    ap.add_argument("--medistill-args", default="", help="extra medistill arguments, one string (e.g. '--workers 0')")
    ap.add_argument("--root", default=None, help="where the JPEG folders go (default: a temporary folder)")
    ap.add_argument("--name", default="scale")
    ap.add_argument("_mode", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._mode[:1] == ["plain"]:
        return plain_loop(a._mode[1], a.steps, int(a._mode[2]))
    if a._mode[:1] == ["medistill"]:
        return medistill_loop(a._mode[1], a.steps, a._mode[2], shlex.split(a.medistill_args))
    from common import machine, save

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    tmp = tempfile.mkdtemp() if a.root is None else a.root
    root = Path(tmp)
    t0 = time.time()
    pool = make_pool(root, max(a.sizes + [a.kd_images]))
    rows = []
    print(f"pool of {max(a.sizes)} JPEGs: {time.time() - t0:.0f} s", flush=True)
    for n in a.sizes:
        tree = make_tree(root, pool, n)
        n_steps = min(a.steps, int(n * 0.7) // 64 - 1)   # within one epoch: 70 % of N trains (default split)
        for r in range(a.runs):
            order = ("plain", "medistill") if r % 2 == 0 else ("medistill", "plain")
            for which in order:
                out = root / f"run_{n}_{r}"
                res: dict = {}
                # a timed run, then a shorter one under the memory sampler (see measured)
                for steps, sample in ((n_steps, False), (a.memory_steps, True)):
                    shutil.rmtree(out, ignore_errors=True)
                    me = [sys.executable, str(Path(__file__).resolve()), "--steps", str(steps)]
                    cmd = me + (["plain", str(tree), "2"] if which == "plain" else
                                [f"--medistill-args={a.medistill_args}", "medistill", str(tree), str(out)])
                    got = measured(cmd, env, sample)
                    res.update(got if not sample else {"peak_rss_mb": got["peak_rss_mb"]})
                res.update(loop=which, n=n, run=r, steps=n_steps, disk_mb=disk_mb(out) if which == "medistill" else 0.0)
                rows.append(res)
                print(res, flush=True)
    kd = kd_epochs(root, pool, a.kd_images, env) if a.kd_images else None
    if kd:
        print(kd, flush=True)
    save(a.name, {"machine": machine(), "steps": a.steps, "memory_steps": a.memory_steps, "rows": rows, "kd": kd,
                  "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:])})
    if a.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
