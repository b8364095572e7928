"""Feature taps by module name on unmodified models (forward hooks, removed on exit)."""

from __future__ import annotations

import difflib
from typing import Iterable

import torch
from torch import nn

from medistill.errors import ModelError
from medistill.models.modes import eval_mode, model_device


def resolve_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Map tap names to modules; an unknown name is an error listing close valid names.

    A name ending in ``:in`` taps the module's *input* (e.g. ``layer4.1.act2:in`` is the
    pre-activation output of a ResNet stage)."""
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        if n.removesuffix(":in") not in mods:
            valid = [k for k in mods if k]
            close = difflib.get_close_matches(n, valid, n=5, cutoff=0.5)
            top = [k for k in valid if "." not in k]
            raise ModelError(f"unknown tap {n!r} on {type(model).__name__}. "
                             + (f"Close: {', '.join(close)}. " if close else "")
                             + f"Top-level modules: {', '.join(top)} (see `medistill models taps`)")
        out[n] = mods[n.removesuffix(":in")]
    return out


def preact_tap(model: nn.Module, stage: str) -> str:
    """The tap name of a ResNet stage's pre-activation output: the input of the last block's
    final activation (timm BasicBlock ``act2``, Bottleneck ``act3``)."""
    mod = dict(model.named_modules()).get(stage)
    if mod is None or not list(mod.children()):
        raise ModelError(f"cannot find a pre-activation tap for {stage!r}")
    last_name, last = list(mod.named_children())[-1]
    acts = [n for n, _ in last.named_children() if n.startswith("act")]
    if not acts:
        raise ModelError(f"{stage}.{last_name} has no act* module; pre-activation taps need a timm ResNet-style block")
    return f"{stage}.{last_name}.{sorted(acts)[-1]}:in"


class FeatureTaps:
    """Record the outputs of named modules during forward passes.

    >>> with FeatureTaps(model, ["layer1", "layer4"]) as taps:
    ...     logits = model(x)
    ...     f4 = taps["layer4"]          # [B, Ch, h, w]

    Outputs are kept with their autograd graph (students need gradients through them); pass
    ``detach=True`` for teachers. Hooks are removed on exit, even after an exception.
    ViT-style token outputs ``[B, N, D]`` are returned unchanged; see
    :func:`medistill.explain.cam.tokens_to_map` to reshape them.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], detach: bool = False):
        self.modules = resolve_modules(model, list(names))
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _store(self, name: str, out: torch.Tensor | tuple) -> None:
        if isinstance(out, (tuple, list)):
            out = out[0]
        self.outputs[name] = out.detach() if self.detach else out

    def __enter__(self) -> "FeatureTaps":
        for n, m in self.modules.items():
            if n.endswith(":in"):
                # clone: the module may be an in-place activation that would overwrite its input
                h = m.register_forward_pre_hook(lambda _m, inp, _n=n: self._store(_n, inp[0].clone()))
            else:
                h = m.register_forward_hook(lambda _m, _i, out, _n=n: self._store(_n, out))
            self._handles.append(h)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise ModelError(f"tap {name!r} recorded nothing (module not used in forward?)")
        return self.outputs[name]

    def clear(self) -> None:
        self.outputs.clear()


def list_taps(model: nn.Module, input_size: int, in_chans: int = 3, max_depth: int = 2) -> list[tuple[str, tuple[int, ...]]]:
    """Names (up to ``max_depth`` dots) and output shapes for one ``[1, in_chans, S, S]`` input."""
    names = [n for n, _ in model.named_modules() if n and n.count(".") < max_depth]
    shapes: dict[str, tuple[int, ...]] = {}
    taps = FeatureTaps(model, names, detach=True)
    with eval_mode(model), taps, torch.no_grad():
        model(torch.zeros(1, in_chans, input_size, input_size, device=model_device(model)))
    for n in names:
        if n in taps.outputs:
            shapes[n] = tuple(taps.outputs[n].shape)
    return [(n, shapes[n]) for n in names if n in shapes]
