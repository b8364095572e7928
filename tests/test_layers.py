"""The layer order of docs/design.md, checked on every import in the source (module level and
inside functions): a package imports only from its own layer or the layers below."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "medistill"
LAYERS = [
    {"errors", "io", "overrides", "config", "classes", "presets", "device", "dist", "losses", "plots", "progress", "__version__"},
    {"data"}, {"models"}, {"rundir"}, {"eval"}, {"distill"}, {"explain"}, {"report"}, {"assemble"}, {"commands"},
    {"api", "cli", "cli_options", "__main__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """``medistill.distill.engine`` → ``distill``; ``medistill.rundir`` → ``rundir``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "medistill"


def imports() -> list[tuple[str, str, str]]:
    """(file, importing unit, imported unit) for every medistill import."""
    out = []
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        unit = _unit(".".join(rel.parts)) if len(rel.parts) > 1 else "medistill"
        if unit == "__init__":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medistill"):
                targets = [f"medistill.{a.name}" for a in node.names] if node.module == "medistill" else [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("medistill.")]
            out += [(str(f.relative_to(ROOT)), unit, _unit(t)) for t in targets if _unit(t) != unit]
    return out


def test_every_unit_has_a_layer() -> None:
    units = {u for _, u, _ in imports()} | {t for *_, t in imports()}
    assert units - {"medistill"} <= set(LEVEL), sorted(units - set(LEVEL))


def test_no_import_from_a_higher_layer() -> None:
    bad = [(f, u, t) for f, u, t in imports() if u in LEVEL and LEVEL[t] > LEVEL[u]]
    assert not bad, "imports from a higher layer: " + "; ".join(f"{f}: {u} → {t}" for f, u, t in bad)


def module_graph() -> dict[str, set[str]]:
    """Module → the medistill modules it imports (module level and inside functions), by file."""
    mods = {".".join(f.relative_to(ROOT.parent).with_suffix("").parts): f for f in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medistill"):
                for a in node.names:       # `from medistill.models import factory` names a module too
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("medistill.")}
        graph[name.removesuffix(".__init__")] = {d for d in deps if d != name.removesuffix(".__init__")}
    return graph


def test_no_import_cycle_between_modules() -> None:
    """Inside a package too: two modules that import each other (even inside a function) are one
    concern split in two, or a missing lower module."""
    graph = module_graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    pkg_inits = {m for m in graph if m.count(".") == 1 and not Path(str(ROOT / m.split(".", 1)[1]) + ".py").is_file()}
    real = [c for c in cycles if not set(c) & pkg_inits]   # a package's __init__ re-exporting its modules is not a cycle
    assert not real, real[:5]


def test_design_doc_states_the_order() -> None:
    text = (ROOT.parents[1] / "docs" / "design.md").read_text()
    assert "data` → `models` → `rundir` → `eval` → `distill` → `explain` → `report` → `assemble` → `commands`" in text


def test_model_modes_restore_each_modules_own_flag() -> None:
    """``eval_mode`` (the one home of "eval mode for a while") gives every submodule its own flag
    back — a BatchNorm frozen in eval inside a training model stays frozen — and ``model_device``
    answers for a model without parameters."""
    import torch
    from torch import nn

    from medistill.models.modes import eval_mode, model_device

    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    m.train()
    m[1].eval()
    with eval_mode(m):
        assert not any(x.training for x in m.modules())
    assert m.training and m[0].training and not m[1].training
    try:
        with eval_mode(m):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert m.training and not m[1].training
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(m) == m[0].weight.device


def test_no_source_file_over_400_lines_and_no_function_over_60() -> None:
    """The size rule of the architecture issue: a file that grows past it is split, not stretched."""
    long_files = [str(f.relative_to(ROOT)) for f in ROOT.rglob("*.py") if len(f.read_text().splitlines()) > 400]
    long_funcs = [f"{f.relative_to(ROOT)}:{n.name}" for f in ROOT.rglob("*.py") for n in ast.walk(ast.parse(f.read_text()))
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long_files and not long_funcs, (long_files, long_funcs)
