"""Where a UMKD step spends its time, term by term, against a KD step — and what SFA's
``pool`` setting saves.

One training step (forward, backward, optimizer) of the UMKD benchmark's student — a ResNet-18 at
28 px (``layer1`` 28×28) — with two ResNet-50 experts whose outputs come from a cache (as in
``umkd_bench.py``, so the experts cost nothing per step): the student alone, KD, and UMKD with
each term switched on in turn. Random images and random expert features of the right shapes:
the time of a step does not depend on their values.

    python benchmarks/umkd_profile.py [--batch 64] [--steps 6] [--bf16] [--threads 2]

Writes ``benchmarks/results/umkd_profile.json`` and prints a table (median step time, ratio to KD).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from common import RESULTS, machine

from medistill.distill.context import StepContext
from medistill.distill.terms import TermSetup, make_term
from medistill.models import FeatureTaps, create_model

SIZE, CLASSES = 28, 5


def _expert_shapes() -> dict[str, tuple[int, ...]]:
    e = create_model("resnet50", CLASSES, 3, SIZE).eval()
    with torch.no_grad(), FeatureTaps(e, ["layer1", "layer4"]) as t:
        e(torch.zeros(1, 3, SIZE, SIZE))
    return {k: (1, *v.shape[1:]) for k, v in t.outputs.items()}


def step_time(terms_cfg: list[dict[str, Any]], batch: int, steps: int, bf16: bool) -> dict[str, Any]:
    """Median seconds of one optimizer step of the student under ``terms_cfg``."""
    torch.manual_seed(0)
    student = create_model("resnet18", CLASSES, 3, SIZE)
    eshape = _expert_shapes()
    experts = {f"expert{i}": create_model("resnet50", CLASSES, 3, SIZE).eval().requires_grad_(False) for i in (0, 1)}
    with FeatureTaps(student, ["layer1", "layer4"]) as t:
        student(torch.zeros(1, 3, SIZE, SIZE))
    shapes = {"s": {k: (1, *v.shape[1:]) for k, v in t.outputs.items()}, **{e: eshape for e in experts}}
    setup = TermSetup(students=["s"], teachers=list(experts), num_classes=CLASSES, class_counts=torch.ones(CLASSES),
                      tap_shapes=shapes, models={"s": student, **experts})
    terms = [make_term(c["type"], "s", {k: v for k, v in c.items() if k not in ("type", "weight")}, setup)
             for c in terms_cfg]
    taps = sorted(set().union(*[tm.taps().get("s", set()) for tm in terms]))
    params = list(student.parameters()) + [p for tm in terms for p in tm.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randn(batch, 3, SIZE, SIZE)
    y = torch.randint(0, CLASSES, (batch,))
    # cached expert outputs: fixed tensors, as the teacher cache hands them to a step
    e_logits = {e: torch.randn(batch, CLASSES) for e in experts}
    e_feats = {e: {k: torch.randn(batch, *s[1:]).relu() for k, s in eshape.items()} for e in experts}
    times: list[float] = []
    for _ in range(steps + 1):            # the first step warms up (allocations, oneDNN kernels)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), FeatureTaps(student, taps) as tp:
            logits = student(x)
            ctx = StepContext({"s": logits, **e_logits}, {"s": dict(tp.outputs), **e_feats}, y, 0.0,
                              torch.ones(CLASSES), torch.full((CLASSES,), 1 / CLASSES), list(experts), ["s"])
            loss = sum(c.get("weight", 1.0) * _value(tm(ctx)) for c, tm in zip(terms_cfg, terms))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times[1:]), "steps": steps}


def _value(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


CASES: dict[str, list[dict[str, Any]]] = {
    "student_only": [{"type": "ce"}],
    "kd": [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9, "temperature": 4.0}],
    "udd": [{"type": "ce"}, {"type": "udd"}],
    "cfa": [{"type": "ce"}, {"type": "cfa", "weight": 10.0}],
    "sfa (pool 1, as the official code)": [{"type": "ce"}, {"type": "sfa", "weight": 10.0, "pool": 1}],
    "sfa (pool 2)": [{"type": "ce"}, {"type": "sfa", "weight": 10.0, "pool": 2}],
    "umkd (sfa pool 1)": [{"type": "ce"}, {"type": "sfa", "weight": 10.0, "pool": 1}, {"type": "cfa", "weight": 10.0},
                          {"type": "udd"}],
    "umkd (sfa pool 2)": [{"type": "ce"}, {"type": "sfa", "weight": 10.0, "pool": 2},
                          {"type": "cfa", "weight": 10.0}, {"type": "udd"}],
    "sfa (pool auto = 4, the default)": [{"type": "ce"}, {"type": "sfa", "weight": 10.0}],
    "umkd (sfa pool auto = 4, the default)": [{"type": "ce"}, {"type": "sfa", "weight": 10.0},
                          {"type": "cfa", "weight": 10.0}, {"type": "udd"}],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = {"machine": machine(), "batch": a.batch, "bf16": a.bf16, "threads": a.threads,
           "date": time.strftime("%Y-%m-%d"), "cases": {}}
    for name in a.cases:
        res["cases"][name] = step_time(CASES[name], a.batch, a.steps, a.bf16)
        print(f"{name}: {res['cases'][name]['median_s']:.3f} s", flush=True)
    kd = res["cases"].get("kd", {}).get("median_s")
    lines = ["| step | median s | ratio to KD |", "|---|---|---|"]
    for name, c in res["cases"].items():
        lines.append(f"| {name} | {c['median_s']:.3f} | " + (f"{c['median_s'] / kd:.2f}" if kd else "–") + " |")
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "umkd_profile.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
