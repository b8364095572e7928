"""Atomic file writing and run-directory metadata.

Every artefact medistill writes (checkpoints, metrics, caches, reports) goes through
:func:`atomic_write`: the content is written to a temporary file in the same directory and
renamed over the target, so a crash never leaves a half-written file and never damages the
previous version.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On failure the temporary file is removed and the previous ``path`` is untouched; an
    ``OSError`` (full disk, read-only directory) becomes a :class:`MedistillError` naming the file.
    """
    from medistill.errors import MedistillError

    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the file the mode an ordinary write would (0666 & ~umask),
        # so teammates and web servers can read results on a shared machine.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except OSError as e:
        raise MedistillError(f"could not write {path}: {e.strerror or e}; the previous version (if any) is intact") from e
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink(missing_ok=True)


def cache_root() -> Path:
    """Where medistill keeps what it can recompute (teacher outputs, file digests):
    ``$MEDISTILL_CACHE_DIR``, else the user cache directory."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("MEDISTILL_CACHE_DIR") or user_cache_dir("medistill"))


def _umask() -> int:
    # os.umask can only be read by setting it; restore it at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line; a line is written with a single ``write`` call and flushed."""
    line = json.dumps(obj, default=_json_default) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def torch_save(path: str | os.PathLike, obj: Any, keep_previous: str | os.PathLike | None = None) -> None:
    """Atomically write ``obj`` with ``torch.save``. ``keep_previous``: once the new file is
    fully written, the old ``path`` is moved there (so a fallback exists) before the rename."""
    from medistill.errors import MedistillError

    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
            if keep_previous is not None and Path(path).is_file():
                os.replace(path, keep_previous)
    except RuntimeError as e:
        # torch's zip writer reports a full disk as RuntimeError ("enforce fail at inline_container").
        raise MedistillError(f"could not write {path}: {str(e).splitlines()[0]} (disk full?); "
                             "the previous version (if any) is intact") from e


# The only non-tensor type that timm's and torchvision's training scripts put into their
# checkpoints (the parsed command line, ``args``). It holds plain values and runs no code when
# rebuilt, so allow-listing it lets ``model_best.pth.tar`` load while weights_only stays on.
SAFE_CHECKPOINT_TYPES = [argparse.Namespace]


def torch_load(path: str | os.PathLike) -> Any:
    """Load a torch file with ``weights_only=True``: never unpickles arbitrary objects
    (only :data:`SAFE_CHECKPOINT_TYPES` beyond tensors and containers)."""
    with torch.serialization.safe_globals(SAFE_CHECKPOINT_TYPES):
        return torch.load(path, map_location="cpu", weights_only=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _git(args: list[str], cwd: str | os.PathLike) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit of medistill itself: only when the package runs from medistill's own
    repository (an editable install of it). A pip-installed medistill inside someone else's
    repository must not report *their* commit as medistill's."""
    if cwd is not None:
        return _git(["rev-parse", "HEAD"], cwd) or None
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "medistill"' not in pyproject.read_text(encoding="utf-8", errors="replace"):
        return None
    top = _git(["rev-parse", "--show-toplevel"], root)
    if top is None or Path(top).resolve() != root:
        return None
    return _git(["rev-parse", "HEAD"], root) or None


def workdir_git() -> dict[str, Any]:
    """The commit of the user's working directory (the experiment code a run traces to), and
    whether it had uncommitted changes; ``None`` values outside a git repository."""
    commit = _git(["rev-parse", "HEAD"], os.getcwd())
    if not commit:
        return {"workdir_git_commit": None, "workdir_git_dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], os.getcwd())
    return {"workdir_git_commit": commit, "workdir_git_dirty": bool(status)}


def environment_info() -> dict[str, Any]:
    """Versions and machine facts recorded in every run directory."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("medistill", "torch", "torchvision", "timm", "torchmetrics", "scikit-learn", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "versions": versions,
        "git_commit": git_commit(),
        **workdir_git(),
        "argv": sys.argv,
    }


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` and prove it is writable, or raise a clear error."""
    from medistill.errors import ConfigError

    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".probe"):
            pass
    except OSError as e:
        raise ConfigError(f"output directory {d} is not writable: {e.strerror or e}") from e
    return d
