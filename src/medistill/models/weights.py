"""Weights files from elsewhere: a state dict read safely from safetensors or a weights-only
torch file (timm's and torchvision's training checkpoints included), and the preprocessing it
was trained with, from the checkpoint's args, a ``config.json`` beside it, or timm's defaults."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from medistill.errors import ModelError
from medistill.io import torch_load

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _refused_global(e: Exception) -> str:
    """The object torch's weights-only unpickler refused (its message names it after "GLOBAL"),
    or "an object" where the message has no such line."""
    import re

    m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
    return m.group(1) if m else "an object"


def read_checkpoint(path: str | os.PathLike, weights: str = "raw") -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Weights from safetensors or a weights-only torch file (``module.``/``model.`` prefixes
    stripped) and, for a training checkpoint of timm's or torchvision's scripts, its ``args`` (the
    parsed command line) as a dict. ``weights="ema"`` takes timm's ``state_dict_ema``."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file not found: {p}")
    try:
        sd = load_file(str(p)) if p.suffix == ".safetensors" else torch_load(p)
    except pickle.UnpicklingError as e:
        if _refused_global(e) == "an object":   # not a refusal: a text file or garbage named .pt
            raise ModelError(f"{p}: not a readable weights file (UnpicklingError: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        # weights_only=True refused an object: it was not run
        raise ModelError(f"{p}: holds pickled objects beyond tensors, which medistill never unpickles (weights_only "
                         f"loading refused {_refused_global(e)}); save the weights as safetensors or as a "
                         "plain state dict") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse is reported with the path
        raise ModelError(f"{p}: not a readable weights file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    args = sd.get("args") if isinstance(sd, dict) else None
    args = vars(args) if hasattr(args, "__dict__") else (args if isinstance(args, dict) else None)
    if weights == "ema":
        if not (isinstance(sd, dict) and isinstance(sd.get("state_dict_ema"), dict)):
            raise ModelError(f"{p}: no EMA weights (state_dict_ema) in this checkpoint; use weights=raw")
        sd = sd["state_dict_ema"]
    for key in ("state_dict", "model", "model_state_dict", "student"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{p}: does not hold a state dict of tensors")
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "model."):
            if k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out, args


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of :func:`read_checkpoint` alone."""
    return read_checkpoint(path)[0]


def checkpoint_preprocessing(args: dict[str, Any] | None, model: nn.Module, fallback_size: int) -> dict[str, Any]:
    """How a model trained elsewhere wants its input: size, mean, std and interpolation, from
    its checkpoint's ``args`` (timm's ``img_size``/``input_size``/``mean``/``std``/
    ``interpolation``), else the model's ``pretrained_cfg``, resolved by timm's own
    ``resolve_data_config``; ``source`` says which. Without either: ``fallback_size`` (the data's)
    and ImageNet statistics."""
    from timm.data import resolve_data_config

    has_cfg = "input_size" in (getattr(model, "pretrained_cfg", None) or {})
    known = {k: v for k, v in (args or {}).items() if k in ("img_size", "input_size", "mean", "std", "interpolation")
             and v not in (None, "")}
    if not known and not has_cfg:
        return {"input_size": fallback_size, "mean": list(IMAGENET[0]), "std": list(IMAGENET[1]),
                "interpolation": "bilinear", "in_chans": 3, "guessed": True,
                "source": "neither checkpoint args nor a pretrained_cfg: the data's size and ImageNet statistics"}
    dc = resolve_data_config(args=dict(args or {}), model=model)
    c, h, w = dc["input_size"]
    if h != w:
        raise ModelError(f"the checkpoint asks for {h}×{w} inputs; medistill feeds square images (set teachers.N.input_size)")
    return {"input_size": int(h), "mean": [float(v) for v in dc["mean"]], "std": [float(v) for v in dc["std"]],
            "interpolation": dc.get("interpolation") or "bilinear", "in_chans": int(c), "guessed": not known,
            "source": "checkpoint args" if known else "timm's pretrained_cfg defaults for the architecture "
                                                     f"({h} px, mean/std {tuple(round(v, 3) for v in dc['mean'])}, "
                                                     f"{dc.get('interpolation') or 'bilinear'})"}


def stated_preprocessing(weights: str | os.PathLike, arch: str) -> dict[str, Any] | None:
    """The preprocessing a ``config.json`` beside a weights file states (timm's hub layout, the
    one medistill exports with every student): side, mean, std, interpolation, and medistill's
    stem mode and model arguments where present; None without one. One naming another
    architecture is refused: it describes another model."""
    p = Path(weights).parent / "config.json"
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text())
        pc = cfg["pretrained_cfg"]
        c, h, w = (int(v) for v in pc["input_size"])
        mean, std = [float(v) for v in pc["mean"]], [float(v) for v in pc["std"]]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{p}: not a readable timm config.json (needs pretrained_cfg.input_size, mean, std; "
                         f"{type(e).__name__}: {e})") from None
    if cfg.get("architecture", arch) != arch:
        raise ModelError(f"{p} describes a {cfg['architecture']}, not the {arch} named for the weights beside it")
    if h != w:
        raise ModelError(f"{p} states {h}×{w} inputs; medistill feeds square images (set teachers.N.input_size)")
    ms = cfg.get("medistill") or {}
    return {"input_size": h, "mean": mean, "std": std, "interpolation": pc.get("interpolation") or "bilinear",
            "in_chans": c, "small_input": ms.get("small_input", "off"),
            "model_args": {k: v for k, v in (cfg.get("model_args") or {}).items() if k != "in_chans"},
            "source": f"{p.name} beside the weights"}
