"""``medistill recipe FILE``: a paper's whole protocol (teachers, then students, sweeps and seeds)
as ordered stages, run resumably with one command. Finished runs are reused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from medistill.config import _deep_merge, _set_dotted, parse_override
from medistill.errors import ConfigError
from medistill.io import write_text
from medistill.commands.sweep import run_sweep, sweep_cells


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    config: dict[str, Any]
    methods: list[str] | None = None
    grid: list[str] | None = None
    seeds: list[int] | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    out: str
    defaults: dict[str, Any] = Field(default_factory=dict, description="merged under every stage's config")
    stages: list[Stage]


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    try:
        r = Recipe.model_validate(yaml.safe_load(p.read_text()))
    except Exception as e:  # noqa: BLE001 - pydantic and YAML errors both name the problem
        raise ConfigError(f"{p}: {e}") from None
    _check_checkpoints(r, p)
    return r


def _checkpoints_read(r: Recipe, st: Stage) -> list[str]:
    """The teacher checkpoints stage ``st`` reads (its teachers' and its grid's)."""
    tree = _deep_merge(r.defaults, st.config)
    wanted = [t.get("checkpoint") for t in tree.get("teachers", []) if isinstance(t, dict)]
    for g in st.grid or []:
        key, _, vals = g.partition("=")
        if key.endswith(".checkpoint"):
            wanted += vals.split(",")
    return [c for c in wanted if c]


def _check_checkpoints(r: Recipe, path: Path) -> None:
    """A teacher checkpoint inside the recipe's ``out`` must be a run an earlier stage makes —
    otherwise the mistake (e.g. ``seed=0`` for the directory ``seed-0``) surfaces only hours
    later, when the stage that needs it starts."""
    out = Path(r.out)
    made: list[str] = []
    for st in r.stages:
        for c in _checkpoints_read(r, st):
            if Path(c).is_relative_to(out) and str(Path(c)) not in made:
                raise ConfigError(f"{path}: stage {st.name!r} reads teacher checkpoint {c!r}, which no earlier "
                                  f"stage makes; earlier stages make: {', '.join(made) or 'nothing'}")
        made += [str(out / st.name / name) for name, *_ in sweep_cells(st.methods, st.grid, st.seeds)]


def teacher_stages(r: Recipe) -> set[str]:
    """Stages whose runs a later stage reads as teachers (e.g. UMKD's two experts, seeds 0 and 1):
    their seeds make different teachers, not repeated measurements, so ``--seeds`` keeps them."""
    read = {str(Path(c)) for st in r.stages for c in _checkpoints_read(r, st)}
    return {st.name for st in r.stages
            if any(str(Path(r.out) / st.name / name) in read for name, *_ in sweep_cells(st.methods, st.grid, st.seeds))}


def run_recipe(path: str | Path, only: list[str] | None = None, overrides: list[str] | None = None,
               console: Console | None = None, seeds: list[int] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run the stages in order (or ``only`` those named); every stage is a sweep writing
    ``OUT/STAGE/results.{csv,md}``; the tables of every stage run so far are concatenated into
    ``OUT/results.md``. ``seeds`` replaces the seed list of the stages that have one (a cheap
    first pass: ``seeds=[0]``); stages without seeds (e.g. a single teacher) and stages whose
    runs later stages read as teachers keep theirs."""
    r = load_recipe(path)
    keep = teacher_stages(r)
    unknown = sorted(set(only or []) - {st.name for st in r.stages})
    if unknown:
        raise ConfigError(f"{path}: no stage named {unknown}; stages: {[st.name for st in r.stages]}")
    console = console or Console(stderr=True)
    out = Path(r.out)
    tables, rows = [], {}
    for st in r.stages:
        if only and st.name not in only:
            # keep the tables of stages run earlier: a partial run must not drop them from results.md
            if (out / st.name / "results.md").is_file():
                tables.append(f"## {st.name}\n\n" + (out / st.name / "results.md").read_text())
            continue
        if seeds and st.seeds and st.name not in keep:
            st = st.model_copy(update={"seeds": list(seeds)})
        tree = _deep_merge(r.defaults, st.config)
        for item in overrides or []:
            k, v = parse_override(item)
            _set_dotted(tree, k, v)
        stage_dir = out / st.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = stage_dir / "stage.yaml"
        write_text(cfg_path, yaml.safe_dump(tree, sort_keys=False))
        console.print(f"[bold]recipe stage[/] {st.name}")
        rows[st.name] = run_sweep(cfg_path, stage_dir, st.methods, st.grid, st.seeds, None, console)
        tables.append(f"## {st.name}\n\n" + (stage_dir / "results.md").read_text())
    write_text(out / "results.md", f"# {r.description}\n\n" + "\n".join(tables))
    return rows
