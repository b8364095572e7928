"""Frozen teachers: BatchNorm folded into convolutions, and the teachers' own precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from conftest import run_engine, tiny_cfg
from medistill import device as devmod
from medistill.config import load_config
from medistill.models.fold import fold_batchnorm
from medistill.models.taps import FeatureTaps


class _BNAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm subclass with an activation inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)         # folded
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)   # folded (no bias)
        self.c3, self.b3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)    # c3's output also feeds a residual: kept
        self.c4, self.b4 = nn.Conv2d(8, 8, 1), _BNAct(8)            # a subclass: kept
        self.c5, self.b5 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)    # tapped convolution: kept when asked
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        y = self.c3(x)
        x = self.b3(y) + y
        x = self.b4(self.c4(x))
        x = self.b5(self.c5(x))
        return self.head(x.mean((2, 3)))


def _randomise_bn(model: nn.Module) -> None:
    """Running statistics and affine weights away from their initial values (else BN is ~identity)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def test_fold_keeps_outputs_names_and_taps() -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    _randomise_bn(net)
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad(), FeatureTaps(net, ["b1", "b5", "c5"]) as taps:
        ref = net(x)
        ref_taps = {k: v.clone() for k, v in taps.outputs.items()}
    names = {n for n, _ in net.named_modules()}
    assert fold_batchnorm(net, keep={"c5"}) == 2
    assert {n for n, _ in net.named_modules()} == names            # every name stays
    assert isinstance(net.b1, nn.Identity) and isinstance(net.b2, nn.Identity)
    assert isinstance(net.b3, nn.BatchNorm2d) and type(net.b4) is _BNAct and isinstance(net.b5, nn.BatchNorm2d)
    assert net.c2.bias is not None   # a bias-free convolution gains the BatchNorm's shift
    with torch.no_grad(), FeatureTaps(net, ["b1", "b5", "c5"]) as taps:
        out = net(x)
        for k, v in ref_taps.items():   # the folded BatchNorm's name still records its values
            torch.testing.assert_close(taps.outputs[k], v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # without the keep set, c5/b5 fold too, and the output is still the same
    assert fold_batchnorm(net) == 1
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_frozen_parameters_stay_frozen_and_training_bn_is_kept() -> None:
    net = _Net()
    for p in net.parameters():
        p.requires_grad_(False)
    assert fold_batchnorm(net) == 0          # training mode: batch statistics, nothing to fold
    net.eval()
    assert fold_batchnorm(net) == 3
    assert not any(p.requires_grad for p in net.parameters())


def test_fold_a_timm_resnet_and_an_untraceable_model() -> None:
    torch.manual_seed(0)
    m = timm.create_model("resnet18", num_classes=3).eval()
    _randomise_bn(m)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), FeatureTaps(m, ["layer3"]) as taps:
        ref, ref3 = m(x), taps.outputs["layer3"].clone()
    n_bn = sum(type(b) is nn.BatchNorm2d for b in m.modules())
    assert fold_batchnorm(m) == n_bn == 20
    with torch.no_grad(), FeatureTaps(m, ["layer3"]) as taps:
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(taps.outputs["layer3"], ref3, rtol=1e-4, atol=1e-4)

    class Branchy(nn.Module):   # control flow on values: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.c(x)) if x.sum() > 0 else x

    b = Branchy().eval()
    assert fold_batchnorm(b) == 0 and isinstance(b.b, nn.BatchNorm2d)


def test_teacher_precision_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for native, want in ((True, "bf16"), (False, "off")):
        monkeypatch.setattr(devmod, "native_bf16", lambda d, n=native: n)
        assert devmod.teacher_amp(cpu, load_config(None, []).train) == want
        assert devmod.teacher_amp(cpu, load_config(None, ["train.amp=fp16"]).train) == "fp16"   # follows amp
        assert devmod.teacher_amp(cpu, load_config(None, ["train.teacher_amp=off"]).train) == "off"
        assert devmod.teacher_amp(cpu, load_config(None, ["train.teacher_amp=bf16"]).train) == "bf16"
    assert devmod.native_bf16(torch.device("meta")) is False


def test_a_run_records_its_teachers_precision_and_caches_under_it(data_dir: Path, teachers: list[Path],
                                                                    tmp_path: Path) -> None:
    """A KD run whose teacher runs in bf16: run_info and the cache manifest say so, the teacher's
    BatchNorms are folded, and the cached outputs are its bf16 outputs on those images."""
    out = tmp_path / "kd"
    cfg = tiny_cfg(data_dir / "tiny.npz", out, epochs=1, teacher_amp="bf16", teacher_cache="on",
                   cache_dir=str(tmp_path / "cache"))
    cfg["teachers"] = [{"name": "t", "checkpoint": str(teachers[0])}]
    cfg["terms"] = [{"type": "ce", "weight": 0.5}, {"type": "kd", "weight": 0.5}]
    engine = run_engine(cfg)
    assert json.loads((out / "run_info.json").read_text())["teacher_amp"] == "bf16"
    cache = engine.cache["t"]
    assert cache.manifest["amp"] == "bf16"
    t = engine.teachers[0]
    assert not any(type(m) is nn.BatchNorm2d for m in t.model.modules())   # folded
    ds = engine.data.dataset("train", train=False)
    x, _, i, _ = zip(*(ds[k] for k in range(4)))
    with torch.no_grad(), devmod.autocast(torch.device("cpu"), "bf16"):
        live = t.logits(torch.stack(x)).float()
    got = cache.lookup(torch.tensor(i), torch.zeros(4, dtype=torch.long))["logits"]
    torch.testing.assert_close(got, live, rtol=1e-2, atol=1e-2)



def test_raw_batch_is_freed_before_backward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader's raw batch (each student normalises its own copy) is no longer alive when the
    backward pass starts: neither the training loop nor the step keeps a reference to it."""
    import weakref

    from conftest import write_npz
    from medistill.distill.engine import Engine

    raw: list[weakref.ref] = []
    alive: list[bool] = []

    class Watched:
        def __init__(self, loader):
            self.loader = loader

        def __len__(self) -> int:
            return len(self.loader)

        def __iter__(self):   # no local name holds a batch while the generator waits
            it = iter(self.loader)
            for _ in range(len(self.loader)):
                yield self.watch(next(it))

        @staticmethod
        def watch(batch):
            raw.append(weakref.ref(batch[0]))
            return batch

    orig_loader, orig_optim = Engine._train_loader, Engine._make_optim

    def make_optim(self):
        orig_optim(self)
        self.students[0].model.register_full_backward_pre_hook(lambda *_: alive.append(raw[-1]() is not None))

    monkeypatch.setattr(Engine, "_train_loader", lambda self, epoch: Watched(orig_loader(self, epoch)))
    monkeypatch.setattr(Engine, "_make_optim", make_optim)
    run_engine(tiny_cfg(write_npz(tmp_path / "d.npz"), tmp_path / "run", epochs=1))
    assert len(alive) == len(raw) >= 3 and not any(alive)
