"""Teacher ensembles: several trained models that act as one teacher.

An ensemble directory holds its members (usually ``seed-N/`` run directories written by
``medistill train --seeds``) and an ``ensemble.json``: the members' model directories (relative
paths), their safetensors sha256, the aggregation and the class names. :class:`EnsembleModel`
runs every member with its own preprocessing on the shared batch ``[B, C, S, S]`` in [0, 1] and
returns logits whose softmax is the aggregated prediction, so a distillation term, the cache
and the metrics treat the ensemble exactly like a single teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medistill.errors import ModelError
from medistill.io import sha256_file, write_json
from medistill.models.factory import ModelSpecRecord, Preprocess, load_model_dir

ENSEMBLE_FILE = "ensemble.json"
AGGREGATIONS = ("prob_mean", "logit_mean")


class EnsembleModel(nn.Module):
    """Members ``(preprocess, model)`` applied to one batch.

    ``prob_mean``: returns ``log(mean_m softmax(z_m))`` ``[B, K]`` (a valid logit vector whose
    softmax is the averaged probabilities; temperature scaling in KD then sharpens/softens the
    ensemble's prediction, not each member's). ``logit_mean``: returns ``mean_m z_m``.
    """

    def __init__(self, members: list[tuple[Preprocess, nn.Module]], aggregation: str = "prob_mean"):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ModelError(f"unknown ensemble aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
        self.pres = nn.ModuleList(p for p, _ in members)
        self.members = nn.ModuleList(m for _, m in members)
        self.aggregation = aggregation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zs = torch.stack([m(p(x)).float() for p, m in zip(self.pres, self.members)])   # [M, B, K]
        if self.aggregation == "logit_mean":
            return zs.mean(0)
        # logsumexp over members of log-softmax, minus log M: the log of the mean probability,
        # computed without leaving log space (no underflow for confident members).
        return torch.logsumexp(torch.log_softmax(zs, -1), 0) - torch.log(torch.tensor(float(zs.shape[0])))


def is_ensemble_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def write_ensemble(directory: str | os.PathLike, members: list[str | os.PathLike],
                   aggregation: str = "prob_mean") -> dict[str, Any]:
    """Write ``ensemble.json`` for ``members`` (paths inside ``directory`` are stored relative
    to it). Members must agree on class count and class names; input sizes may differ (each
    member keeps its own preprocessing)."""
    d = Path(directory)
    if len(members) < 2:
        raise ModelError(f"an ensemble needs at least 2 members, got {len(members)}")
    if aggregation not in AGGREGATIONS:
        raise ModelError(f"unknown ensemble aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
    rows, first = [], None
    from medistill.data.medmnist import same_classes
    from medistill.rundir import resolve_teacher   # run dir → its single model (rundir imports this module)

    for m in members:
        md = resolve_teacher(str(m))
        if not (md / "model.json").is_file():
            raise ModelError(f"ensemble member {m}: expected a model directory or a run with one student")
        spec = json.loads((md / "model.json").read_text())
        if first is None:
            first = (md, spec)
        elif spec["num_classes"] != first[1]["num_classes"] or not same_classes(spec["class_names"], first[1]["class_names"]):
            raise ModelError(f"ensemble members disagree on the classes: {first[0]} has {first[1]['num_classes']} "
                             f"({', '.join(first[1]['class_names'])}), {md} has {spec['num_classes']} "
                             f"({', '.join(spec['class_names'])})")
        try:
            rel = os.path.relpath(md.resolve(), d.resolve())
        except ValueError:   # another drive (Windows): keep the absolute path
            rel = str(md.resolve())
        rows.append({"model_dir": rel, "arch": spec["arch"], "input_size": spec["input_size"],
                     "sha256": sha256_file(md / "model.safetensors")})
    record = {"format": 1, "aggregation": aggregation, "num_classes": first[1]["num_classes"],
              "class_names": first[1]["class_names"], "members": rows}
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / ENSEMBLE_FILE, record)
    return record


def read_ensemble(directory: str | os.PathLike) -> dict[str, Any]:
    p = Path(directory) / ENSEMBLE_FILE
    try:
        rec = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{p}: unreadable ensemble description ({e})") from e
    if not isinstance(rec, dict) or not rec.get("members"):
        raise ModelError(f"{p}: no members listed")
    return rec


def load_ensemble(directory: str | os.PathLike, check_hashes: bool = True
                  ) -> tuple[EnsembleModel, list[ModelSpecRecord], str, dict[str, Any]]:
    """Build the ensemble of ``directory``: the module, the members' specs, a sha256 that
    identifies the ensemble (aggregation + members' weight hashes, in order; the teacher cache
    is keyed by it) and the ``ensemble.json`` record. A member whose weights changed since the
    ensemble was written is an error naming it."""
    d = Path(directory)
    rec = read_ensemble(d)
    members, specs = [], []
    for row in rec["members"]:
        md = (d / row["model_dir"]) if not Path(row["model_dir"]).is_absolute() else Path(row["model_dir"])
        if not (md / "model.json").is_file():
            raise ModelError(f"ensemble {d}: member {row['model_dir']} is missing")
        if check_hashes and sha256_file(md / "model.safetensors") != row["sha256"]:
            raise ModelError(f"ensemble {d}: member {row['model_dir']} changed since the ensemble was written "
                             "(sha256 differs); rewrite ensemble.json or restore the member")
        model, pre, spec = load_model_dir(md)
        members.append((pre, model))
        specs.append(spec)
    ens = EnsembleModel(members, rec.get("aggregation", "prob_mean")).eval()
    digest = hashlib.sha256(json.dumps([rec.get("aggregation"), [r["sha256"] for r in rec["members"]]]).encode()).hexdigest()
    return ens, specs, digest, rec
