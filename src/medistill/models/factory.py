"""One model factory over timm (plus ``cnn5``), small-input adaptation, local weights,
per-model preprocessing, and model directories (``model.json`` + safetensors).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from medistill.data.transforms import resize
from medistill.errors import ModelError
from medistill.io import atomic_write, write_json
from medistill.models.weights import (  # noqa: F401  (re-exported: the one model-files import)
    IMAGENET,
    checkpoint_preprocessing,
    read_checkpoint,
    read_state_dict,
    stated_preprocessing,
)
from medistill.models import cnn5 as _cnn5  # noqa: F401  (registers cnn5 with timm)
from medistill.models.modes import eval_mode

SMALL_INPUT_MAX = 64

# Inputs from this side up keep the stem's pooling (total stride 16, last map 3–4 px at 48–64 px);
# smaller ones lose it too (stride 8, 4×4 at 28 px). Keeping the max-pool at 64 px cuts a
# ResNet-18's FLOPs by 4× for the same 4×4 last map.
KEEP_POOL_FROM = 48

# What the small-input adaptation changes, per family and regime (the docs table is generated from this).
ADAPTATIONS = {
    "ResNet": "conv1 7×7/2 → 3×3/1, maxpool removed (total stride 32 → 8; layer4 is 4×4 at 28 px)",
    "ResNet/pool": "conv1 7×7/2 → 3×3/1, maxpool kept (total stride 32 → 16; layer4 is 4×4 at 64 px)",
    "DenseNet": "conv0 7×7/2 → 3×3/1, pool0 removed (total stride 32 → 8; 3×3 at 28 px)",
    "DenseNet/pool": "conv0 7×7/2 → 3×3/1, pool0 kept (total stride 32 → 16; 4×4 at 64 px)",
    "EfficientNet": "conv_stem stride 2 → 1 (total stride 32 → 16; 2×2 at 28 px, 4×4 at 64 px); also MobileNetV2",
    "MobileNetV3": "conv_stem stride 2 → 1 (total stride 32 → 16)",
    "ConvNeXt": "stem 4×4/4 → 3×3/1 (total stride 32 → 8)",
    "ConvNeXt/pool": "stem 4×4/4 → 3×3/2 (total stride 32 → 16; 4×4 at 64 px)",
    "CNN5": "none needed (ceil-mode pooling)",
}


def list_model_names() -> list[str]:
    return timm.list_models()       # cnn5 is registered with timm (models/cnn5.py)


def _unknown_model(name: str) -> ModelError:
    close = difflib.get_close_matches(name, list_model_names(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See `medistill models list`."
    return ModelError(f"unknown model {name!r}.{hint}")


def _adapt_small_input(model: nn.Module, in_chans: int, keep_pool: bool) -> str | None:
    """Make the stem fit a small input: stride 1 in the first conv; ``keep_pool`` keeps the
    stem's pooling (total stride 16), otherwise it goes too (stride 8)."""
    kind = type(model).__name__
    if kind == "ResNet":
        old = model.conv1
        if isinstance(old, nn.Conv2d):
            model.conv1 = nn.Conv2d(in_chans, old.out_channels, 3, 1, 1, bias=False)
        else:  # deep stem: make its first conv stride 1
            first = next(m for m in old.modules() if isinstance(m, nn.Conv2d))
            first.stride = (1, 1)
        if not keep_pool:
            model.maxpool = nn.Identity()
    elif kind == "DenseNet":
        old = model.features.conv0
        model.features.conv0 = nn.Conv2d(in_chans, old.out_channels, 3, 1, 1, bias=False)
        if not keep_pool:
            model.features.pool0 = nn.Identity()
    elif kind in ("EfficientNet", "MobileNetV3"):
        model.conv_stem.stride = (1, 1)
        return ADAPTATIONS[kind]
    elif kind == "ConvNeXt":
        old = model.stem[0]
        model.stem[0] = nn.Conv2d(in_chans, old.out_channels, 3, 2 if keep_pool else 1, 1)
    else:
        return None
    return ADAPTATIONS[f"{kind}/pool" if keep_pool else kind]


def create_model(name: str, num_classes: int, in_chans: int = 3, input_size: int = 224,
                 pretrained: bool | str = False, small_input: str = "auto", **kwargs: Any) -> nn.Module:
    """Build ``name`` with a ``num_classes`` head.

    ``small_input``: "auto" adapts the stem of ResNet/DenseNet/EfficientNet/MobileNet/ConvNeXt
    when ``input_size <= 64`` (see :data:`ADAPTATIONS`; the stem's pooling is kept from
    :data:`KEEP_POOL_FROM` px up); "on"/"off" force it; "stride8"/"stride16" force the
    adaptation with the stem's pooling removed/kept whatever the size (e.g. a cheap ResNet
    at 32 px: "stride16" costs a quarter of "stride8" for a 2×2 instead of 4×4 last map). ``pretrained`` may be
    a local weights file (safetensors or a weights-only torch file); the head is re-initialised
    when its shape differs. ``True`` asks timm's hub and needs network access.
    The adaptation applied is stored as ``model.medistill_adaptation``.
    """
    if num_classes < 2:
        raise ModelError(f"num_classes must be ≥ 2, got {num_classes}")
    dual_head = bool(kwargs.pop("dual_head", False))
    if not timm.is_model(name):
        raise _unknown_model(name)
    try:
        model = _timm_create(name, num_classes, in_chans, input_size, pretrained is True, kwargs)
    except TypeError as e:
        raise ModelError(f"{name} does not accept the keyword arguments {sorted(kwargs)} ({e}); "
                         "see timm's documentation of the model for its arguments") from e
    except ValueError as e:
        if "no published weights" in str(e):
            raise ModelError(f"{name}: {e}") from e
        raise
    except (OSError, RuntimeError) as e:
        if pretrained is True:
            raise ModelError(f"could not fetch hub weights for {name!r} (offline?): {e}. "
                             "Pass a local weights file as pretrained=PATH instead.") from e
        raise
    adaptation = None
    if small_input in ("stride8", "stride16"):
        adaptation = _adapt_small_input(model, in_chans, keep_pool=small_input == "stride16")
    elif small_input == "on" or (small_input == "auto" and input_size <= SMALL_INPUT_MAX):
        adaptation = _adapt_small_input(model, in_chans, keep_pool=input_size >= KEEP_POOL_FROM)
    model.medistill_adaptation = adaptation  # type: ignore[attr-defined]
    if isinstance(pretrained, str) and pretrained:
        load_weights(model, pretrained, strict=False)
    if dual_head:
        from medistill.models.dualhead import DualHead

        model = DualHead(model, num_classes)
        model.medistill_adaptation = adaptation  # type: ignore[attr-defined]
    _check_forward(model, name, in_chans, input_size)
    return model


def _timm_create(name: str, num_classes: int, in_chans: int, input_size: int, hub: bool,
                 kwargs: dict[str, Any]) -> nn.Module:
    """Transformers with patch embeddings (ViT, Visformer, Swin, …) fix their input size at
    construction; they get ``img_size=input_size``. Convnets do not take the argument, which
    timm reports as a TypeError naming it — then they are built without it."""
    if "img_size" not in kwargs:
        try:
            return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, pretrained=hub,
                                     img_size=input_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, pretrained=hub, **kwargs)


def _check_forward(model: nn.Module, name: str, in_chans: int, input_size: int) -> None:
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, in_chans, input_size, input_size))
    except (RuntimeError, AssertionError) as e:  # timm's size checks are assertions
        raise ModelError(f"{name} cannot run on {input_size}×{input_size} inputs ({e}); "
                         "use a larger input_size or small_input=on") from e


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """Load local weights (``state``, when already read from ``path``). ``strict``: any
    missing/unexpected key or shape mismatch is an error that names it. Non-strict (fine-tuning
    init): mismatched head weights are skipped."""
    sd = read_state_dict(path) if state is None else state
    own = model.state_dict()
    mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape}
    if strict:
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if mismatched or missing or unexpected:
            parts = []
            if mismatched:
                k, (a, b) = next(iter(mismatched.items()))
                parts.append(f"shape mismatch at {k}: file {a} vs model {b}" + (" (class count differs?)" if len(b) <= 2 else ""))
            if missing:
                parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
            raise ModelError(f"{path}: incompatible with the model: " + "; ".join(parts))
        model.load_state_dict(sd)
        return
    sd = {k: v for k, v in sd.items() if k in own and k not in mismatched}
    if not sd:
        raise ModelError(f"{path}: no tensor matches the model's parameters (other architecture?)")
    model.load_state_dict(sd, strict=False)


class Preprocess(nn.Module):
    """Adapt a shared batch ``[B, C_data, S, S]`` in [0, 1] to one model: channel count,
    input size and normalisation. Part of every participant and of exported models."""

    def __init__(self, data_chans: int, in_chans: int, input_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 interpolation: str = "bilinear"):
        super().__init__()
        self.data_chans, self.in_chans, self.input_size = data_chans, in_chans, input_size
        self.interpolation = interpolation
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:
                x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                raise ModelError(f"cannot feed {x.shape[1]}-channel images to a {self.in_chans}-channel model")
        x = resize(x, self.input_size, self.interpolation)
        # the same arithmetic as (x − mean) / std, dividing in place: one full-size temporary
        # instead of two (12 ms less per 64×224² batch on 2 cores; autograd allows it, as the
        # subtraction's backward does not need its output)
        return (x - self.mean).div_(self.std)


@dataclass
class ModelSpecRecord:
    """What ``model.json`` stores: enough to rebuild the model and its preprocessing exactly."""

    arch: str
    num_classes: int
    in_chans: int
    data_chans: int
    input_size: int
    small_input: str
    mean: list[float]
    std: list[float]
    class_names: list[str]
    kwargs: dict[str, Any] = field(default_factory=dict)
    adaptation: str | None = None
    data_size: int | None = None    # side the data pipeline resized images to before Preprocess
    data_fingerprint: str | None = None   # the dataset the model was trained on (teacher checks)
    threshold: float | None = None   # binary tasks: P(class 1) ≥ threshold predicts class 1 (chosen on validation)
    threshold_rule: str | None = None

    def build(self) -> tuple[nn.Module, Preprocess]:
        model = create_model(self.arch, self.num_classes, self.in_chans, self.input_size,
                             small_input=self.small_input, **self.kwargs)
        return model, Preprocess(self.data_chans, self.in_chans, self.input_size, tuple(self.mean), tuple(self.std))


def data_size(native: int | None, specs: list[ModelSpecRecord], from_files: bool = False) -> int:
    """The one rule for the side the data pipeline resizes images to before each model's own
    :class:`Preprocess`: the dataset's own side when all its images share one (``native``), else
    the side recorded with the model (``data_size``, what its run trained on), else the largest
    input size among ``specs``. Images read from files (``from_files``) are decoded at that
    largest side when it is smaller than their own (a 512-px folder trained at 224 is decoded at
    224, JPEGs at a reduced scale: see ``read_image``), since every model would shrink them anyway.
    Training, evaluation, explanation, export and prediction all use it, so that a model sees the
    same pixels everywhere."""
    need = max((s.data_size or s.input_size for s in specs), default=None)
    if native and (not from_files or need is None or native <= need):
        return native
    if need is None:
        raise ModelError("no model to take the data size from")
    return need


def resolve_norm(norm: Any, pretrained: bool | str, in_chans: int) -> tuple[list[float], list[float]]:
    if isinstance(norm, (tuple, list)) and len(norm) == 2 and isinstance(norm[0], (list, tuple)):
        mean, std = list(norm[0]), list(norm[1])
    elif norm == "imagenet" or (norm == "auto" and pretrained):
        mean, std = list(IMAGENET[0]), list(IMAGENET[1])
    else:
        mean, std = [0.5] * 3, [0.5] * 3
    if in_chans == 1 and len(mean) == 3:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    if len(mean) != in_chans or len(std) != in_chans:
        raise ModelError(f"normalisation has {len(mean)} channels, the model {in_chans}")
    return mean, std


def save_model_dir(directory: str | os.PathLike, model: nn.Module, spec: ModelSpecRecord,
                   weights_name: str = "model.safetensors") -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # the record travels inside the weights file too, so a lone .safetensors still says what it is
    meta = {"format": "pt", "medistill": json.dumps(asdict(spec))}
    atomic_write(d / weights_name, lambda p: save_file(sd, str(p), metadata=meta))
    write_json(d / "model.json", asdict(spec))
    from medistill.models.timm_config import write_config

    write_config(d, spec)


def load_model_dir(path: str | os.PathLike, weights_name: str = "model.safetensors") -> tuple[nn.Module, Preprocess, ModelSpecRecord]:
    """Load a model directory (or the ``model.json`` beside a weights file)."""
    p = Path(path)
    if p.is_file():
        d, wfile = p.parent, p
    else:
        d, wfile = p, p / weights_name
    meta = d / "model.json"
    if not meta.is_file():
        raise ModelError(f"{d}: no model.json (not a medistill model directory)")
    try:
        spec = ModelSpecRecord(**json.loads(meta.read_text()))
    except (TypeError, json.JSONDecodeError) as e:
        raise ModelError(f"{meta}: unreadable model description ({e})") from e
    model, pre = spec.build()
    load_weights(model, wfile, strict=True)
    model.eval()
    return model, pre, spec
