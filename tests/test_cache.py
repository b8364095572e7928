"""The teacher cache as derived data: verified on load, a damaged one moved aside and rebuilt
(said in one line, never deleted), a read-only cache folder replaced by the run's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from medistill.distill.cache import TeacherCache, manifest_key
from medistill.errors import CacheDamagedError, CacheMismatchError


def _distill(teacher: Path, out: Path, *more: str):
    return run_cli("distill", "--teacher", str(teacher), "--method", "kd", "--model", "cnn5", "--epochs", "1",
                   "--out", str(out), "--set", "students.0.kwargs.widths=[8,8,16,16,16]",
                   "--set", "train.teacher_amp=off", "--set", "train.latency=false", *more)


def _said(p) -> str:
    """What a run printed, without whitespace: rich folds long paths across lines anywhere."""
    return "".join((p.stdout + p.stderr).split())


def _nows(text: str) -> str:
    return "".join(text.split())


def _test_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["test"]


def _cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("teacher-*.safetensors") if ".damaged-" not in p.name)


@pytest.mark.parametrize("damage", ["data cut in half", "manifest garbage"])
def test_a_damaged_cache_is_moved_aside_and_rebuilt(damage: str, teachers: list[Path], tmp_path: Path) -> None:
    cache = tmp_path / "teacher_cache"        # the suite's MEDISTILL_CACHE_DIR
    first = _distill(teachers[0], tmp_path / "fresh")
    assert first.returncode == 0, _said(first)[-800:]
    [data] = _cache_files(cache)
    meta = data.with_suffix(".json")
    if damage == "data cut in half":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        meta.write_text("{not json")
    damaged = (data.read_bytes(), meta.read_bytes())
    again = _distill(teachers[0], tmp_path / "again")
    said = _said(again)
    assert again.returncode == 0, said[-800:]
    assert "internalerror" not in said
    reason = "the data file is unreadable" if damage == "data cut in half" else "its manifest"
    assert _nows(f"teacher cache damaged: {data}: {reason}") in said and _nows("moved aside") in said
    assert said.count(_nows("teacher cache damaged")) == 1 and "rebuilt" in said
    # the damaged pair is kept beside, byte for byte; a whole cache is in its place again
    aside = sorted(cache.glob("*.damaged-*"))
    assert [p.suffix for p in aside] == [".json", ".safetensors"]
    assert (aside[1].read_bytes(), aside[0].read_bytes()) == damaged
    TeacherCache.load(data, json.loads(meta.read_text()))
    assert _test_metrics(tmp_path / "again") == _test_metrics(tmp_path / "fresh")


def test_a_cache_folder_that_cannot_be_written_falls_back_to_the_run(teachers: list[Path], tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")                   # a folder under a file can never be made, even by root
    p = _distill(teachers[0], tmp_path / "run", "--set", f"train.cache_dir={blocker / 'cache'}")
    said = _said(p)
    assert p.returncode == 0, said[-800:]
    assert _nows(f"teacher cache: {blocker / 'cache'} is not writable (Not a directory); using this run's own cache") in said
    assert len(_cache_files(tmp_path / "run" / "teacher_cache")) == 1


def _saved_cache(tmp_path: Path) -> tuple[Path, dict]:
    manifest = {"format": 1, "teacher_name": "t", "views": [0], "outputs": ["logits"]}
    positions = torch.tensor([0, -1, 1])
    cache = TeacherCache(manifest, {"logits": torch.arange(6.0).reshape(1, 2, 3)}, positions)
    return cache.save(tmp_path), manifest


def test_load_verifies_stamp_shapes_and_manifest(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    data, manifest = _saved_cache(tmp_path)
    ok = TeacherCache.load(data, manifest)
    assert ok.lookup(torch.tensor([2]), torch.tensor([0]))["logits"].tolist() == [[3.0, 4.0, 5.0]]
    with pytest.raises(CacheMismatchError, match="teacher_name is \"t\" there but \"u\" now"):
        TeacherCache.load(data, dict(manifest, teacher_name="u"))
    # the data file of another manifest under this one's name: its stamp says so
    t = load_file(str(data))
    save_file(t, str(data), metadata={"manifest_sha256": manifest_key(dict(manifest, views=[1]))})
    with pytest.raises(CacheDamagedError, match="written for another manifest"):
        TeacherCache.load(data, manifest)
    # whole, stamped, but the tensors do not have the manifest's shape (a view missing)
    t["out.logits"] = t["out.logits"][:, :1]
    save_file(t, str(data), metadata={"manifest_sha256": manifest_key(manifest)})
    with pytest.raises(CacheDamagedError, match="do not have the shapes its manifest describes"):
        TeacherCache.load(data, manifest)
    data.with_suffix(".json").write_text("[1, 2]")
    with pytest.raises(CacheDamagedError, match="is not a JSON object"):
        TeacherCache.load(data, manifest)
    data.with_suffix(".json").unlink()
    with pytest.raises(CacheDamagedError, match="no manifest"):
        TeacherCache.load(data, manifest)
