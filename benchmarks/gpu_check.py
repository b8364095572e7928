"""The one-command GPU check of the issue "medistill on GPUs" (#14).

    python benchmarks/gpu_check.py                    # on a CUDA host: everything on cuda, < 8 min
    python benchmarks/gpu_check.py --device cpu --quick   # the same steps on a CPU (a dry run)

Steps, each recorded with its exit status and time (a failed step does not stop the others):

1. ``pytest -m gpu`` (the tests that need CUDA);
2. train a teacher; distil it into a student with KD with the teacher cache and live, and DKD;
   one epoch each of UMKD and the uncertainty-aware dual-student method;
3. explain with Grad-CAM and Score-CAM; export to ONNX and predict;
4. ``torchrun --nproc_per_node=1`` (NCCL on CUDA, gloo on CPU);
5. images/s of medistill's training step against a bare PyTorch loop written below (same
   model from the same factory, batch, mixed precision, channels_last, resident uint8 data,
   random flips on the device) for ResNet-18 at 28 px and 64 px, on synthetic MedMNIST-format
   data large enough to time;
6. a KD epoch with the teacher cache against a student-only epoch (the target is ≤ 1.1×);
7. peak device memory of each run, and GPU utilisation sampled by ``nvidia-smi`` while it ran.

Writes ``$OUT/gpu_check.json`` and ``$OUT/gpu_check.md`` (a table for docs/benchmarks.md, with the
device name). Its Python dependencies are medistill's own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def synthetic_npz(path: Path, n_train: int, size: int, classes: int = 5, seed: int = 0) -> Path:
    """A MedMNIST-format file whose class c is a bright square in cell c of a grid, plus noise:
    learnable, and as large as timing needs."""
    rng = np.random.default_rng(seed)
    parts = {}
    for split, n in (("train", n_train), ("val", max(200, n_train // 10)), ("test", max(200, n_train // 10))):
        y = rng.integers(0, classes, n)
        x = rng.integers(0, 80, (n, size, size, 3), dtype=np.uint8)
        cell = size // 3
        for c in range(classes):
            r, q = divmod(c, 3)
            x[y == c, r * cell:(r + 1) * cell, q * cell:(q + 1) * cell] = 200
        parts[f"{split}_images"], parts[f"{split}_labels"] = x, y[:, None].astype(np.uint8)
    np.savez(path, **parts)
    return path


class Steps:
    """Run commands, recording each one's status, time and the tail of its output."""

    def __init__(self, out: Path, env: dict[str, str]):
        self.out, self.env, self.rows = out, env, []
        self.log = open(out / "commands.log", "a")

    def run(self, name: str, cmd: list[str], timeout: int = 300) -> bool:
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=REPO)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = 124, f"timed out after {timeout}s: {e}"
        dt = time.perf_counter() - t0
        self.log.write(f"\n$ {' '.join(cmd)}\n{text}\nrc={rc} ({dt:.1f}s)\n")
        self.log.flush()
        self.rows.append({"step": name, "rc": rc, "seconds": round(dt, 1), "tail": text[-600:] if rc else ""})
        print(f"{'ok ' if rc == 0 else 'FAIL'} {name} ({dt:.1f}s)", flush=True)
        return rc == 0


class GpuSampler:
    """GPU utilisation and memory from ``nvidia-smi`` every 0.5 s, on a thread, labelled by phase."""

    def __init__(self) -> None:
        self.samples: list[tuple[str, float, float]] = []
        self.phase = "idle"
        self.ok = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout.strip().split(",")
                self.samples.append((self.phase, float(out[0]), float(out[1])))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> "GpuSampler":
        if self.ok:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def summary(self) -> dict[str, dict[str, float]]:
        by: dict[str, list[tuple[float, float]]] = {}
        for phase, util, mem in self.samples:
            by.setdefault(phase, []).append((util, mem))
        return {p: {"util_mean_pct": round(statistics.mean(u for u, _ in v), 1), "util_max_pct": max(u for u, _ in v),
                    "mem_max_mib": max(m for _, m in v), "samples": len(v)} for p, v in by.items()}


def bare_loop(npz: Path, size: int, batch: int, amp: str, device: str, epochs: int) -> dict[str, float]:
    """Plain PyTorch: uint8 images resident on the device, per-sample random flips there, the
    same ResNet-18 (medistill's factory, so the same small-input stem), AdamW, cross-entropy,
    channels_last, autocast. Returns images/s of the epochs after the first (warm-up)."""
    import torch
    import torch.nn.functional as F

    from medistill.device import amp_dtype, synchronize
    from medistill.models.factory import create_model

    dev = torch.device(device)
    d = np.load(npz)
    x_all = torch.from_numpy(d["train_images"]).permute(0, 3, 1, 2).contiguous().to(dev)
    y_all = torch.from_numpy(d["train_labels"][:, 0].astype(np.int64)).to(dev)
    n, k = len(y_all), int(y_all.max()) + 1
    torch.manual_seed(0)
    model = create_model("resnet18", k, 3, size).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    mean = torch.tensor([0.5, 0.5, 0.5], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.5, 0.5], device=dev).view(1, 3, 1, 1)
    dtype = amp_dtype(amp)
    model.train()
    times = []
    for _ in range(epochs):
        synchronize(dev)
        t0 = time.perf_counter()
        perm = torch.randperm(n, device=dev)
        for b in range(n // batch):
            idx = perm[b * batch:(b + 1) * batch]
            x = x_all[idx].float().div_(255)
            flip = torch.rand(len(idx), device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(x).float(), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        synchronize(dev)
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"images_per_s": round((n // batch) * batch / steady, 1), "epoch_s": [round(t, 3) for t in times]}


def medistill_epochs(npz: Path, out: Path, size: int, batch: int, amp: str, device: str, epochs: int,
                     teacher: Path | None = None) -> dict[str, Any]:
    """medistill's engine on the same data and settings (resident, flips, channels_last); the
    images/s of its training epochs after the first, from ``metrics.jsonl``."""
    from medistill.config import load_config
    from medistill.distill.engine import Engine

    base: dict[str, Any] = {
        "data": {"name": str(npz), "augment": "flip", "resident": "on"},
        "students": [{"name": "s", "model": "resnet18", "input_size": size}],
        "train": {"epochs": epochs, "batch_size": batch, "amp": amp, "channels_last": True, "device": device,
                  "progress": False, "latency": False, "eval_batch_size": 512},
        "optim": {"name": "adamw", "lr": 1e-3}, "eval": {"bootstrap": 0}, "out": str(out)}
    if teacher is not None:
        base["teachers"] = [{"name": "t", "checkpoint": str(teacher)}]
        base["terms"] = [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9, "temperature": 4.0}]
        base["train"]["teacher_cache"] = "on"
    Engine(load_config(None, [], base=base)).run()
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [e["train_time_s"] for e in log]
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    n = len(json.loads((out / "split.json").read_text())["train"])
    info = json.loads((out / "run_info.json").read_text())
    return {"images_per_s": round(n / steady, 1), "epoch_s": times, "peak_device_memory_mb": info.get("peak_device_memory_mb")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--amp", default=None, help="default: bf16 on cuda, off on cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that every step runs (CPU dry run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    a = ap.parse_args()
    amp = a.amp or ("bf16" if a.device.startswith("cuda") else "off")
    out = Path(a.out).resolve()
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "MEDISTILL_CACHE_DIR": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "MEDISTILL_CACHE_DIR")})
    n_bench, epochs, small = (512, 2, 600) if a.quick else (20000, 4, 3000)
    data = {s: synthetic_npz(work / f"synth{s}.npz", n_bench, s) for s in (28, 64)}
    small_npz = synthetic_npz(work / "small.npz", small, 28, seed=1)
    steps = Steps(out, env)
    ms = [sys.executable, "-m", "medistill"]
    dev = ["--device", a.device, "--amp", amp]
    quiet = ["--set", "train.latency=false", "--set", "train.progress=false"]
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": a.device, "amp": amp, "quick": a.quick,
                              "python": platform.python_version()}
    import torch

    result["torch"] = torch.__version__
    result["device_name"] = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu"
    with GpuSampler() as gpu:
        gpu.phase = "pytest -m gpu"
        steps.run("pytest -m gpu", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"], 400)
        gpu.phase = "methods"
        t, r = work / "teacher", work / "runs"
        ep = ["--epochs", "1" if a.quick else "3"]
        steps.run("train teacher (resnet18)", ms + ["train", "--data", str(small_npz), "--model", "resnet18", "--out", str(t)]
                  + ep + dev + quiet)
        two = ["--model", "resnet18", "--model", "cnn5"]
        for name, method, extra in (("kd cached", "kd", ["--set", "train.teacher_cache=on", "--set", "data.augment=flip"]),
                                    ("kd live", "kd", ["--set", "train.teacher_cache=off", "--set", "data.augment=standard"]),
                                    ("dkd", "dkd", []), ("umkd (1 epoch)", "umkd", []),
                                    ("dual_student (1 epoch)", "dual_student", two)):
            steps.run(name, ms + ["distill", "--data", str(small_npz), "--teacher", str(t), "--method", method]
                      + ([] if extra is two else ["--model", "resnet18"]) + ["--out", str(r / name.split(" (")[0].replace(" ", "_"))]
                      + (["--epochs", "1"] if "1 epoch" in name else ep) + dev + quiet + extra)
        kd = r / "kd_cached"
        gpu.phase = "explain/export/predict"
        steps.run("explain gradcam,scorecam", ms + ["explain", str(kd), "--methods", "gradcam,scorecam", "--images", "8",
                                                    "--top-k", "16", "--device", a.device])
        steps.run("export onnx", ms + ["export", str(kd), "--out", str(work / "student.onnx")])
        png = work / "img.png"
        from PIL import Image

        Image.fromarray(np.load(small_npz)["test_images"][0]).save(png)
        steps.run("predict (torch, --cam)", ms + ["predict", str(kd), str(png), "--cam", "--out", str(work / "cam"),
                                                  "--device", a.device])
        steps.run("predict (onnx)", ms + ["predict", str(work / "student.onnx"), str(png)])
        gpu.phase = "torchrun"
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun") or "torchrun"
        steps.run("torchrun --nproc_per_node=1", [torchrun, "--nproc_per_node=1", "--master_addr=127.0.0.1",
                                                  "--master_port=29533", "-m", "medistill", "train", "--data", str(small_npz),
                                                  "--model", "resnet18", "--epochs", "1", "--out", str(r / "torchrun")]
                  + dev + quiet)
        tr_info = r / "torchrun" / "run_info.json"
        result["torchrun_backend"] = json.loads(tr_info.read_text()).get("dist_backend") if tr_info.is_file() else None
        bench: dict[str, Any] = {}
        for size in (28, 64):
            gpu.phase = f"bare loop {size}px"
            bare = bare_loop(data[size], size, 128, amp, a.device, epochs)
            gpu.phase = f"medistill {size}px"
            ours = medistill_epochs(data[size], work / f"ms{size}", size, 128, amp, a.device, epochs)
            bench[f"{size}px"] = {"bare": bare, "medistill": ours,
                                  "ratio": round(ours["images_per_s"] / bare["images_per_s"], 3)}
            print(f"{size}px: medistill {ours['images_per_s']} img/s, bare {bare['images_per_s']} img/s", flush=True)
        result["throughput"] = bench
        gpu.phase = "kd cached vs student only"
        teacher28 = work / "ms28"
        kd_run = medistill_epochs(data[28], work / "kd28", 28, 128, amp, a.device, epochs, teacher=teacher28)
        alone = bench["28px"]["medistill"]
        result["kd_vs_alone"] = {"kd_epoch_s": statistics.median(kd_run["epoch_s"][1:] or kd_run["epoch_s"]),
                                 "alone_epoch_s": statistics.median(alone["epoch_s"][1:] or alone["epoch_s"])}
        result["kd_vs_alone"]["ratio"] = round(result["kd_vs_alone"]["kd_epoch_s"] / result["kd_vs_alone"]["alone_epoch_s"], 3)
    result["steps"] = steps.rows
    result["gpu_utilisation"] = gpu.summary() if gpu.ok else "nvidia-smi not found"
    if a.device.startswith("cuda"):
        result["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    sys.exit(0 if all(s["rc"] == 0 for s in steps.rows) else 1)


def markdown(r: dict[str, Any]) -> str:
    lines = [f"GPU check on **{r['device_name']}** (`{r['device']}`, amp {r['amp']}, torch {r['torch']}, "
             f"{r['date']}{', quick dry run' if r['quick'] else ''}). Command: `python benchmarks/gpu_check.py"
             f"{' --device ' + r['device'] if r['device'] != 'cuda' else ''}{' --quick' if r['quick'] else ''}`.", "",
             "| step | status | s |", "|---|---|---|"]
    lines += [f"| {s['step']} | {'ok' if s['rc'] == 0 else 'rc ' + str(s['rc'])} | {s['seconds']} |" for s in r.get("steps", [])]
    lines += ["", f"torchrun --nproc_per_node=1 backend: {r.get('torchrun_backend')}", "",
              "| ResNet-18, batch 128, resident data | medistill img/s | bare loop img/s | ratio (target ≥ 0.8) | peak MB |",
              "|---|---|---|---|---|"]
    for k, v in r.get("throughput", {}).items():
        lines.append(f"| {k} | {v['medistill']['images_per_s']} | {v['bare']['images_per_s']} | {v['ratio']} | "
                     f"{v['medistill'].get('peak_device_memory_mb')} |")
    kd = r.get("kd_vs_alone")
    if kd:
        lines += ["", f"KD epoch with the teacher cache {kd['kd_epoch_s']:.2f} s vs student-only {kd['alone_epoch_s']:.2f} s: "
                      f"ratio {kd['ratio']} (target ≤ 1.1)."]
    util = r.get("gpu_utilisation")
    if isinstance(util, dict) and util:
        lines += ["", "| phase | GPU util mean % | max % | memory max MiB |", "|---|---|---|---|"]
        lines += [f"| {p} | {u['util_mean_pct']} | {u['util_max_pct']} | {u['mem_max_mib']} |" for p, u in util.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
