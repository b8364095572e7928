"""Teacher-output cache: teacher logits (and tapped features) computed once per
(data, split, view set, teacher checkpoint, preprocessing), stored as safetensors with a JSON
manifest, refused on any mismatch.

Valid only when the teacher's view of every training image can be enumerated: no augmentation,
or a finite view set (``flip``, ``dihedral``) whose views are all cached. Random crops make a
cache invalid — the engine then runs the teacher on every batch and says why.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from platformdirs import user_cache_dir
from safetensors.torch import load_file, save_file

from medistill.errors import CacheMismatchError
from medistill.io import atomic_write, write_json

def default_cache_dir() -> Path:
    return Path(os.environ.get("MEDISTILL_CACHE_DIR") or Path(user_cache_dir("medistill")) / "teacher_cache")


def manifest_key(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


class TeacherCache:
    """Outputs ``[V, N, ...]`` for V views of the N training images of one teacher."""

    def __init__(self, manifest: dict[str, Any], outputs: dict[str, torch.Tensor], positions: torch.Tensor):
        self.manifest = manifest
        self.outputs = outputs                    # name ("logits" or tap) → [V, N, ...]
        self.views: list[int] = manifest["views"]
        self.view_row = {v: i for i, v in enumerate(self.views)}
        self.positions = positions                # source index → row, −1 where absent

    def lookup(self, source_idx: torch.Tensor, view: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = self.positions[source_idx]
        if (rows < 0).any():
            raise CacheMismatchError("teacher cache has no entry for some training images (other split?)")
        vrows = torch.tensor([self.view_row[int(v)] for v in view.tolist()])
        return {k: t[vrows, rows] for k, t in self.outputs.items()}

    @staticmethod
    def paths(directory: Path, manifest: dict[str, Any]) -> tuple[Path, Path]:
        key = manifest_key(manifest)[:20]
        stem = f"{manifest['teacher_name']}-{key}"
        return directory / f"{stem}.safetensors", directory / f"{stem}.json"

    def save(self, directory: Path) -> Path:
        data_path, meta_path = self.paths(directory, self.manifest)
        tensors = {f"out.{k}": v.contiguous() for k, v in self.outputs.items()}
        tensors["positions"] = self.positions
        atomic_write(data_path, lambda p: save_file(tensors, str(p)))
        write_json(meta_path, self.manifest)
        return data_path

    @classmethod
    def load(cls, data_path: Path, expected: dict[str, Any]) -> "TeacherCache":
        """Load and check the manifest field by field; any difference is a :class:`CacheMismatchError`."""
        meta_path = data_path.with_suffix(".json")
        if not meta_path.is_file():
            raise CacheMismatchError(f"{data_path}: no manifest beside the cache; refusing to use it")
        found = json.loads(meta_path.read_text())
        diff = [k for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
        if diff:
            k = diff[0]
            raise CacheMismatchError(
                f"teacher cache {data_path} was built for another configuration: {k} is "
                f"{_short(found.get(k))} there but {_short(expected.get(k))} now"
                + (f" (and {len(diff) - 1} more field(s))" if len(diff) > 1 else "")
            )
        t = load_file(str(data_path))
        outputs = {k[4:]: v for k, v in t.items() if k.startswith("out.")}
        return cls(found, outputs, t["positions"])


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) < 70 else s[:67] + "..."
