"""``torchrun ... tests/ddp_rank_dump.py DUMP_DIR medistill-args...``: the CLI, with every rank
saving what it trained (students and the terms' own modules) to ``DUMP_DIR/rank{R}.safetensors``
when training ends — so a test compares the ranks' weights itself instead of trusting the
divergence the engine reports about itself."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from medistill import cli
from medistill.distill.engine import Engine

dump = Path(sys.argv.pop(1))
original = Engine.finalize


def finalize(self: Engine):
    state = {f"student.{s.name}.{k}": v.detach().cpu().contiguous()
             for s in self.students for k, v in s.model.state_dict().items()}
    state |= {f"term.{k}": v.detach().cpu().contiguous() for k, v in self.terms.state_dict().items()}
    save_file(state, str(dump / f"rank{os.environ['RANK']}.safetensors"))
    return original(self)


Engine.finalize = finalize
sys.argv = ["medistill", *sys.argv[1:]]
cli.main()
