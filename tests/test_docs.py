"""Every ``medistill`` command shown in README.md and docs/ names a real command and only
options that command accepts, and every command's --help renders."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from medistill.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _examples() -> list[tuple[str, str]]:
    """(file, command line) of every shell example that runs medistill."""
    out = []
    for path in DOCS:
        in_code = False
        for line in path.read_text().splitlines():
            if line.strip().startswith("```"):
                in_code = not in_code
                continue
            if not in_code:
                continue
            text = line.split(" #", 1)[0].strip().rstrip("\\").strip()
            if re.match(r"^(medistill|torchrun .* -m medistill|python -m medistill) ", text):
                out.append((path.name, text))
    return out


EXAMPLES = _examples()


def _is_group(cmd: object) -> bool:
    return hasattr(cmd, "commands")      # typer vendors its own click: no isinstance(click.Group)


def _resolve(tokens: list[str]) -> tuple[object, list[str]]:
    cmd = typer.main.get_command(app)
    rest = tokens
    while _is_group(cmd) and rest and rest[0] in cmd.commands:
        cmd, rest = cmd.commands[rest[0]], rest[1:]
    return cmd, rest


def test_docs_have_examples():
    assert len(EXAMPLES) >= 15


@pytest.mark.parametrize("where,line", EXAMPLES, ids=[f"{w}:{i}" for i, (w, _) in enumerate(EXAMPLES)])
def test_documented_command_is_valid(where, line):
    tokens = shlex.split(line)
    tokens = tokens[tokens.index("medistill") + 1:]
    cmd, rest = _resolve(tokens)
    assert not _is_group(cmd), f"{where}: {line!r} names no subcommand"
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    used = {t.split("=", 1)[0] for t in rest if t.startswith("--")}
    assert used <= known, f"{where}: {line!r} uses {sorted(used - known)}, not options of `{cmd.name}`"


def test_every_help_renders():
    from typer.testing import CliRunner

    runner = CliRunner()
    root = typer.main.get_command(app)
    stack: list[tuple[list[str], object]] = [([], root)]
    seen = 0
    while stack:
        path, cmd = stack.pop()
        res = runner.invoke(app, [*path, "--help"])
        assert res.exit_code == 0, (path, res.output)
        seen += 1
        if _is_group(cmd):
            stack += [([*path, n], c) for n, c in cmd.commands.items()]
    assert seen >= 12
