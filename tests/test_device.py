"""Device choice and mixed precision (CPU here; the GPU path is exercised by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_engine, tiny_cfg, write_npz
from medistill.config import load_config
from medistill.device import resolve_device
from medistill.distill.checkpoint import check_resume_config
from medistill.errors import ConfigError
from medistill.io import torch_load


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else resolve_device("auto").type)
    with pytest.raises(ConfigError, match="use auto, cpu, cuda"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") in (torch.device("cpu"), torch.device("mps"))
        with pytest.raises(ConfigError, match="no usable CUDA device"):
            resolve_device("cuda:0")


def test_bf16_is_an_alias_of_amp() -> None:
    assert load_config(None, ["train.bf16=true"]).train.amp == "bf16"
    assert load_config(None, ["train.amp=fp16"]).train.amp == "fp16"
    with pytest.raises(ConfigError, match="conflicts with train.amp=fp16"):
        load_config(None, ["train.bf16=true", "train.amp=fp16"])
    with pytest.raises(ConfigError, match="train.device"):
        load_config(None, ["train.device=gpu0"])


def test_fp16_run_checkpoints_its_scaler(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    run = run_engine(tiny_cfg(npz, tmp_path / "r", epochs=2, device="cpu", amp="fp16", grad_clip=1.0)).out
    st = torch_load(run / "checkpoint_last.pt")
    assert "scale" in st["scaler"]["scaler"] and st["scaler"]["scaler"]["scale"] > 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["device"] == "cpu" and info["amp"] == "fp16"
    assert 0.0 <= json.loads((run / "metrics.json").read_text())["test"]["balanced_accuracy"] <= 1.0
    plain = torch_load(run_engine(tiny_cfg(npz, tmp_path / "p", epochs=1)).out / "checkpoint_last.pt")
    assert "scaler" not in plain


def test_resume_accepts_configs_saved_before_amp_existed(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.bf16=true"])
    old = yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))
    for k in ("amp", "device", "deterministic"):
        del old["train"][k]
    del old["data"]["ordinal"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_resume_config(tmp_path / "config.yaml", cfg)          # same experiment: no error
    with pytest.raises(ConfigError, match="train.epochs"):
        check_resume_config(tmp_path / "config.yaml", load_config(None, ["train.bf16=true", "train.epochs=3"]))


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_cuda_run_matches_cpu_evaluation(tmp_path: Path, amp: str) -> None:
    """On a GPU: a run trains on CUDA, records the device and its peak memory, and the saved
    model evaluated on the CPU gives the metrics the run wrote."""
    from medistill.commands.evaluate import evaluate_target

    npz = write_npz(tmp_path / "d.npz")
    run = run_engine(tiny_cfg(npz, tmp_path / "r", epochs=2, device="cuda", amp=amp)).out
    info = json.loads((run / "run_info.json").read_text())
    assert info["device"].startswith("cuda") and info["peak_device_memory_mb"] > 0
    gpu = json.loads((run / "metrics.json").read_text())["test"]
    cpu = evaluate_target(run, out=tmp_path / "cpu", latency=False)["student"]["test"]
    assert cpu["balanced_accuracy"] == pytest.approx(gpu["balanced_accuracy"], abs=0.02)


def test_compile_captures_students_with_taps(tmp_path: Path) -> None:
    """train.compile: the student's training forward goes through torch.compile (the eager
    backend here: graph capture without code generation, fast on CPU) with persistent feature
    taps, and trains exactly as without it."""
    import json

    from conftest import run_engine, tiny_cfg, write_npz

    npz = write_npz(tmp_path / "d.npz")
    run_engine(tiny_cfg(npz, tmp_path / "t", epochs=1))
    logs = {}
    for mode in ("off", "eager"):
        cfg = tiny_cfg(npz, tmp_path / mode, epochs=2, compile=mode)
        cfg["teachers"] = [{"name": "t", "checkpoint": str(tmp_path / "t")}]
        cfg["terms"] = [{"type": "ce"}, {"type": "at", "weight": 10.0, "pairs": [["conv3", "conv3"]]}]
        eng = run_engine(cfg)
        if mode == "eager":
            assert type(eng.nets["student"]).__name__ == "OptimizedModule"
            assert not eng.fixed_taps["student"]._handles       # hooks removed after training
        logs[mode] = [json.loads(x)["train"]["student"] for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(logs["off"], logs["eager"]):
        assert a["at"] == pytest.approx(b["at"], rel=1e-4) and a["ce"] == pytest.approx(b["ce"], rel=1e-4)


def _resident_cache_explain_predict(tmp_path: Path, device: str) -> None:
    """Resident batches with random crops, a teacher cache held on the device, and explanations
    and predictions computed there."""
    from medistill.commands.deploy import predict_files
    from medistill.explain.run import explain_run

    npz = write_npz(tmp_path / "d.npz")
    run_engine(tiny_cfg(npz, tmp_path / "t", epochs=1, device=device))
    cfg = tiny_cfg(npz, tmp_path / "s", epochs=1, device=device, amp="bf16")
    cfg["data"].update(augment="dihedral", resident="on")
    cfg["teachers"] = [{"name": "t", "checkpoint": str(tmp_path / "t")}]
    cfg["terms"] = [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9}]
    eng = run_engine(cfg)
    assert eng.cache["t"].outputs["logits"].device.type == device
    live = tiny_cfg(npz, tmp_path / "live", epochs=1, device=device)
    live["data"].update(augment="standard", resident="on")
    assert run_engine(live).data.use_resident()
    rep = explain_run(tmp_path / "s", n_images=4, methods=["gradcam", "scorecam"], top_k=4, device=device)
    assert rep["device"].startswith(device) and 0 <= rep["models"]["student"]["methods"]["scorecam"]["fidelity"] <= 1
    from PIL import Image

    png = tmp_path / "x.png"
    Image.fromarray(np.load(npz)["test_images"][0]).save(png)
    out = predict_files(tmp_path / "s", [png], cam=True, out_dir=tmp_path / "cam", device=device)
    assert out[0]["class"] in range(3)


def test_resident_cache_explain_predict_cpu(tmp_path: Path) -> None:
    _resident_cache_explain_predict(tmp_path, "cpu")


@pytest.mark.gpu
def test_resident_cache_explain_predict_cuda(tmp_path: Path) -> None:
    _resident_cache_explain_predict(tmp_path, "cuda")
