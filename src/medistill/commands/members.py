"""``medistill train --seeds``: one run per seed under ``OUT/seed-N``, then the ensemble
directory (``ensemble.json``) and the ensemble's own evaluation. Resumable: finished members
are kept, interrupted ones resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from medistill.assemble import assemble_run, execute_run
from medistill.config import Override, override_key
from medistill.errors import ConfigError


def train_seed_ensemble(config: Any, overrides: Sequence[Override], seeds: list[int], out: str | Path, *,
                        models: Sequence[str] | None = None, input_size: int | None = None, resume: bool = False,
                        download: bool = False, pretrained: bool = False, console: Any = None,
                        aggregation: str = "prob_mean") -> dict[str, Any]:
    """Train every member (the same config, ``train.seed`` = each seed), then write and evaluate
    the ensemble; returns the ensemble's metrics."""
    from medistill.commands.evaluate import evaluate_ensemble
    from medistill.rundir import write_ensemble

    if any(override_key(o) == "train.seed" for o in overrides):
        raise ConfigError("give either --seed or --seeds, not both")
    if not str(out).strip():
        raise ConfigError("--seeds needs --out ENSEMBLE_DIR")
    members = []
    for s in seeds:
        d = Path(out) / f"seed-{s}"
        members.append(d)
        if resume and (d / "students").is_dir() and (d / "metrics.json").is_file():
            if console is not None:
                console.print(f"{d}: finished, kept")
            continue
        if not resume and d.exists() and any(d.iterdir()):
            raise ConfigError(f"ensemble member {d} already exists; pass --resume to continue the ensemble "
                              "or choose another --out")
        again = resume and (d / "checkpoint_last.pt").is_file()
        member = [o for o in overrides if override_key(o) != "out"] + [("out", str(d)), ("train.seed", s)]
        cfg = assemble_run("train", config, member, models=models, input_size=input_size, pretrained=pretrained,
                           resume=again, console=console)
        execute_run(cfg, resume=again, download=download, console=console)
    write_ensemble(out, members, aggregation)
    return evaluate_ensemble(out)
