"""docs/recipes.md's commands as a contract (#35), checked without running them: a paper's recipe
at its smallest stated size is teachers plus a seeded grid of students — tens of minutes to hours
on the CI's 2 cores, over the suite's 5-minute budget — so every command is checked for what
makes it fail at once or hours in: the recipe file loads, ``--only`` names its stages, every
``--set`` key validates against every selected stage's config, and every run directory another
command reads (``explain RUN``, ``--compare NAME=RUN``, ``--teacher``) is one a recipe stage makes.
The recipes' stages themselves run end to end, shrunk, in test_references/test_cli."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from medistill.commands.recipe import load_recipe
from medistill.commands.sweep import sweep_cells
from medistill.config import _deep_merge, load_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "recipes.md"


def commands() -> list[list[str]]:
    """Token lists of the ``medistill``/``python`` lines in the doc's code blocks, with
    backslash continuations joined and ``#`` comments dropped."""
    out, in_code, pending = [], False, ""
    for line in DOC.read_text().splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            continue
        text = pending + " " + line.split(" #", 1)[0].strip() if pending else line.split(" #", 1)[0].strip()
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        if text.startswith(("medistill ", "python ")):
            out.append(shlex.split(text))
    return out


CMDS = commands()
RECIPES = [c for c in CMDS if c[:2] == ["medistill", "recipe"]]


def _opts(tokens: list[str], name: str) -> list[str]:
    return [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == name]


def made_runs() -> set[Path]:
    """Every run directory the recipes in configs/papers make (OUT/STAGE/CELL)."""
    runs = set()
    for f in sorted((ROOT / "configs" / "papers").glob("*.yaml")):
        r = load_recipe(f)
        for st in r.stages:
            runs |= {Path(r.out) / st.name / name for name, *_ in sweep_cells(st.methods, st.grid, st.seeds)}
    return runs


def test_the_doc_has_recipe_commands():
    assert len(RECIPES) >= 8 and any("--set" in c for c in RECIPES)


@pytest.mark.parametrize("tokens", RECIPES, ids=[" ".join(c[2:5]) for c in RECIPES])
def test_recipe_command_is_valid(tokens, monkeypatch):
    monkeypatch.chdir(ROOT)
    r = load_recipe(tokens[2])
    only = [s for o in _opts(tokens, "--only") for s in o.split(",")]
    names = [st.name for st in r.stages]
    assert set(only) <= set(names), f"{' '.join(tokens)}: --only {sorted(set(only) - set(names))} not in {names}"
    sets = _opts(tokens, "--set")
    for st in r.stages:
        if only and st.name not in only:
            continue
        _name, _method, point, _seed = sweep_cells(st.methods, st.grid, st.seeds)[0]
        # the first cell's config with the command's overrides: a bad key or value raises here
        cfg = load_config(base=_deep_merge(r.defaults, st.config), overrides=[*sets, *[f"{k}={v}" for k, v in point]])
        for s in sets:
            key, value = s.split("=", 1)
            got = cfg.model_dump(mode="json")
            for part in key.split("."):
                got = got[int(part)] if isinstance(got, list) else got[part]
            assert str(got).lower() == value.lower(), f"{s} did not reach stage {st.name}: {got!r}"


def test_runs_the_doc_reads_are_made_by_a_recipe():
    made = made_runs()
    read = []
    for c in CMDS:
        if c[:2] == ["medistill", "explain"]:
            read.append(c[2])
        read += [v.split("=", 1)[1] for v in _opts(c, "--compare")]
        read += [v for v in _opts(c, "--teacher") if v.startswith("runs/")]
    assert read, "no command reads a recipe's run"
    for path in read:
        p = Path(path)
        assert any(p == m or p.is_relative_to(m) for m in made), f"{path}: no recipe stage makes this run"
