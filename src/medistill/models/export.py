"""Students that leave intact: a timm-style ``config.json`` beside each saved student, and
:func:`load_student`, which rebuilds it from that file alone.

``config.json`` follows the layout of timm's Hugging Face hub files (``architecture``,
``num_classes``, ``label_names``, ``model_args``, ``pretrained_cfg`` with ``input_size``,
``mean``, ``std``, ``interpolation``) so that timm itself can read the weights; a ``medistill``
section records what timm cannot know: the small-input stem adaptation, the side the data
pipeline resized images to, the data's channels and the decision threshold. Where the stem is
unmodified, ``timm.create_model(arch, pretrained=True, num_classes=K,
pretrained_cfg_overlay={**config["pretrained_cfg"], "file": "model.safetensors"})`` builds the
same network; with an adapted stem, :func:`load_student` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medistill.errors import ModelError

CONFIG_FILE = "config.json"


def timm_config(spec: Any) -> dict[str, Any]:
    """The ``config.json`` of a student record (:class:`ModelSpecRecord`)."""
    return {
        "architecture": spec.arch,
        "num_classes": spec.num_classes,
        "label_names": list(spec.class_names),
        "model_args": {"in_chans": spec.in_chans, **spec.kwargs},
        "pretrained_cfg": {
            "architecture": spec.arch, "num_classes": spec.num_classes,
            "input_size": [spec.in_chans, spec.input_size, spec.input_size], "fixed_input_size": False,
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
            "mean": list(spec.mean), "std": list(spec.std), "label_names": list(spec.class_names),
        },
        "medistill": {
            "stem": "timm" if not spec.adaptation else "adapted",
            "small_input": spec.small_input, "adaptation": spec.adaptation,
            "data_size": spec.data_size, "data_chans": spec.data_chans,
            "threshold": spec.threshold, "threshold_rule": spec.threshold_rule,
            "note": "images in [0, 1], resized (bilinear, antialiased) to input_size, normalised with mean/std",
        },
    }


def write_config(directory: str | os.PathLike, spec: Any) -> None:
    from medistill.io import write_json

    write_json(Path(directory) / CONFIG_FILE, timm_config(spec))


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
    from medistill.models.factory import ModelSpecRecord, load_weights

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
