"""A timm-style ``config.json`` beside each saved student (:func:`medistill.models.saved.load_student`
rebuilds the student from that file alone).

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

import os
from pathlib import Path
from typing import Any

from medistill.io import write_json

CONFIG_FILE = "config.json"


# Architectures medistill registers with timm itself: plain timm (without medistill) cannot build them.
MEDISTILL_ARCHS = {"cnn5"}


def plain_timm_note(spec: Any) -> str | None:
    """Why plain ``timm.create_model`` + these weights would not be this student (None: it is).
    An adapted stem loads without error into timm's own stem and computes other outputs."""
    if spec.adaptation:
        return (f"adapted stem ({spec.adaptation}): plain timm.create_model({spec.arch!r}) builds timm's own stem, "
                "loads these weights without error and computes other outputs; load with "
                "medistill.api.load_student(FOLDER)")
    if spec.arch in MEDISTILL_ARCHS or spec.kwargs.get("dual_head"):
        return f"{spec.arch} is medistill's own architecture (or head); load with medistill.api.load_student(FOLDER)"
    return None


def timm_config(spec: Any) -> dict[str, Any]:
    """The ``config.json`` of a student record (:class:`ModelSpecRecord`); ``load_with`` names
    medistill's loader where plain timm would build another network (:func:`plain_timm_note`)."""
    note = plain_timm_note(spec)
    return {**({"load_with": "medistill.api.load_student", "why": note} if note else {}),
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
    write_json(Path(directory) / CONFIG_FILE, timm_config(spec))
