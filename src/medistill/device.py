"""Where a run computes: device choice, mixed precision and what the run records about both.

``train.device``: ``auto`` (CUDA if present, then Apple MPS, else CPU), ``cpu``, ``cuda``,
``cuda:N`` or ``mps``. ``train.amp``: ``off``, ``bf16`` or ``fp16`` (fp16 with a gradient scaler
whose state is checkpointed). ``train.teacher_amp``: the frozen teachers' own precision
(:func:`teacher_amp`). Under torchrun each rank takes ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator

import torch

from medistill.errors import ConfigError

_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(spec: str = "auto") -> torch.device:
    """The ``torch.device`` for ``spec``; a device this machine lacks is a :class:`ConfigError`."""
    spec = spec.strip().lower()
    if not _SPEC.match(spec):
        raise ConfigError(f"train.device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    local = os.environ.get("LOCAL_RANK")
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            spec = "mps"
        else:
            spec = "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={spec}: this machine has no usable CUDA device "
                              "(use --device cpu or auto)")
        index = int(spec.split(":")[1]) if ":" in spec else (int(local) if local is not None else 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if spec == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("train.device=mps: Apple's MPS backend is not available here")
    return torch.device(spec)


def amp_dtype(amp: str) -> torch.dtype | None:
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX units. Elsewhere a CPU emulates it, 10–30× slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch exposes its CPU feature checks only under these private names
        return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def teacher_amp(device: torch.device, train: Any) -> str:
    """The precision of the frozen teachers' forward passes, live and when their outputs are
    cached: ``train.teacher_amp``; ``auto`` is ``train.amp`` when that is on, else bf16 where the
    device computes it natively (:func:`native_bf16`), else off. A frozen teacher only supplies
    targets: bf16 moved a ResNet-18 teacher's logits by at most 2.6 % of their spread (top-1
    agreement 99.7 %) while a folded ResNet-50 ran 3.1× faster than fp32 on a CPU with
    AVX512-BF16 (docs/benchmarks.md "A frozen teacher's precision")."""
    if train.teacher_amp != "auto":
        return train.teacher_amp
    if train.amp != "off":
        return train.amp
    return "bf16" if native_bf16(device) else "off"


@contextlib.contextmanager
def autocast(device: torch.device, amp: str) -> Iterator[None]:
    """Mixed precision for forward passes (``amp`` off: full precision)."""
    dtype = amp_dtype(amp)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        yield


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def device_info(device: torch.device) -> dict[str, Any]:
    """What ``run_info.json`` records about the device."""
    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    elif device.type == "cpu":
        info["device_name"] = "cpu"
    return info


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously): time work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory allocated by tensors on a CUDA device since the last reset (None elsewhere)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return None
