"""A saved student, rebuilt from its ``config.json`` and ``model.safetensors`` alone
(:func:`load_student`), with its preprocessing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medistill.errors import ModelError
from medistill.models.factory import ModelSpecRecord, load_weights
from medistill.models.timm_config import CONFIG_FILE


class Student(nn.Module):
    """A saved student with its preprocessing: ``[B, C, H, W]`` in [0, 1] → logits ``[B, K]``."""

    def __init__(self, pre: nn.Module, model: nn.Module, config: dict[str, Any]):
        super().__init__()
        self.pre, self.model, self.config = pre, model, config
        self.class_names: list[str] = list(config.get("label_names") or [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.pre(x))


def load_student(directory: str | os.PathLike) -> Student:
    """Rebuild a student from its ``config.json`` and ``model.safetensors`` (nothing else read),
    in eval mode on the CPU."""
    d = Path(directory)
    if d.is_file():
        d = d.parent
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelError(f"{cfg_path} is missing: load_student needs the config.json that medistill writes beside "
                         "model.safetensors (students saved before 2026-12 have only model.json: re-evaluate the run "
                         "with `medistill evaluate RUN` to write it)")
    try:
        cfg = json.loads(cfg_path.read_text())
        pc, ms = cfg["pretrained_cfg"], cfg.get("medistill", {})
        c, s, _ = pc["input_size"]
        args = {k: v for k, v in cfg.get("model_args", {}).items() if k != "in_chans"}
        spec = ModelSpecRecord(arch=cfg["architecture"], num_classes=int(cfg["num_classes"]), in_chans=int(c),
                               data_chans=int(ms.get("data_chans") or c), input_size=int(s),
                               small_input=ms.get("small_input", "off"), mean=list(pc["mean"]), std=list(pc["std"]),
                               class_names=list(cfg.get("label_names") or []), kwargs=args,
                               data_size=ms.get("data_size"))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_path}: not a medistill student config ({type(e).__name__}: {e})") from e
    model, pre = spec.build()
    load_weights(model, d / "model.safetensors", strict=True)
    return Student(pre, model, cfg).eval()
