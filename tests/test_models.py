from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medistill.errors import ModelError
from medistill.models import (FeatureTaps, ModelSpecRecord, create_model, list_taps, load_model_dir, load_weights,
                              save_model_dir)
from medistill.models.cost import count_flops, count_params


def test_resnet_small_input_keeps_4x4() -> None:
    m = create_model("resnet18", 5, 3, 28)
    with FeatureTaps(m, ["layer4"]) as taps:
        m(torch.zeros(2, 3, 28, 28))
        assert taps["layer4"].shape == (2, 512, 4, 4)
    plain = create_model("resnet18", 5, 3, 28, small_input="off").eval()
    with FeatureTaps(plain, ["layer4"]) as taps:
        plain(torch.zeros(1, 3, 28, 28))
        assert taps["layer4"].shape[-1] == 1
    assert "maxpool removed" in m.medistill_adaptation


@pytest.mark.parametrize("name", ["mobilenetv2_100", "densenet121", "efficientnet_b0"])
def test_other_families_run_at_28(name: str) -> None:
    m = create_model(name, 5, 3, 28)
    assert m(torch.zeros(2, 3, 28, 28)).shape == (2, 5)
    assert m.medistill_adaptation


@pytest.mark.parametrize("name,size", [("visformer_tiny", 64), ("vit_tiny_patch16_224", 32)])
def test_patch_transformers_built_for_the_input_size(name: str, size: int) -> None:
    # these fix their input size at construction; without img_size they refuse 64 px
    m = create_model(name, 3, 3, size).eval()
    assert m(torch.zeros(2, 3, size, size)).shape == (2, 3)


def test_unrunnable_size_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="cannot run on 16×16"):
        create_model("densenet121", 3, 3, 16, small_input="off")


def test_unknown_model_suggests() -> None:
    with pytest.raises(ModelError, match="resnet18"):
        create_model("resnet-18", 5)


def test_cnn5_taps_and_grayscale() -> None:
    m = create_model("cnn5", 4, 1, 28, widths=[8, 8, 8, 8, 8])
    shapes = dict(list_taps(m, 28, 1))
    assert shapes["conv1"] == (1, 8, 28, 28) and shapes["conv5"] == (1, 8, 2, 2)
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 4)


def test_taps_removed_after_exit_and_on_error() -> None:
    m = create_model("cnn5", 3, 3, 16, widths=[4, 4, 4, 4, 4])
    with FeatureTaps(m, ["conv2"]):
        pass
    assert all(len(mod._forward_hooks) == 0 for mod in m.modules())
    with pytest.raises(RuntimeError):
        with FeatureTaps(m, ["conv2"]):
            raise RuntimeError("boom")
    assert all(len(mod._forward_hooks) == 0 for mod in m.modules())
    with pytest.raises(ModelError, match="conv2"):
        FeatureTaps(m, ["conv9"])


def test_weights_prefix_strip_and_mismatch(tmp_path: Path) -> None:
    m = create_model("cnn5", 3, 3, 16, widths=[4, 4, 4, 4, 4])
    sd = {f"module.{k}": v for k, v in m.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    m2 = create_model("cnn5", 3, 3, 16, widths=[4, 4, 4, 4, 4])
    load_weights(m2, tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    m5 = create_model("cnn5", 5, 3, 16, widths=[4, 4, 4, 4, 4])
    with pytest.raises(ModelError, match="class count"):
        load_weights(m5, tmp_path / "w.pt")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="missing"):
        load_weights(m2, tmp_path / "other.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        load_weights(m2, tmp_path / "junk.pt")


def test_pickle_payload_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    m = create_model("cnn5", 3, 3, 16, widths=[4, 4, 4, 4, 4])
    with pytest.raises(ModelError, match="evil.pt"):
        load_weights(m, tmp_path / "evil.pt")


def test_model_dir_roundtrip(tmp_path: Path) -> None:
    spec = ModelSpecRecord("cnn5", 3, 3, 3, 16, "auto", [0.5] * 3, [0.5] * 3, ["a", "b", "c"], {"widths": [4, 4, 4, 4, 4]})
    m, pre = spec.build()
    save_model_dir(tmp_path / "m", m, spec)
    m2, pre2, spec2 = load_model_dir(tmp_path / "m")
    x = torch.rand(2, 3, 16, 16)
    m.eval()
    assert torch.allclose(m(pre(x)), m2(pre2(x))) and spec2 == spec


def test_cost() -> None:
    m = torch.nn.Linear(10, 4)
    assert count_params(m) == 44
    assert count_flops(m, (1, 10)) == 2 * 10 * 4


def test_cnn5_is_a_timm_model() -> None:
    import timm

    from medistill.models.cnn5 import CNN5

    m = timm.create_model("cnn5", num_classes=4, in_chans=1, widths=[4, 4, 8, 8, 8])
    assert isinstance(m, CNN5) and m.fc.out_features == 4 and m.conv1[0].in_channels == 1
    assert "cnn5" in timm.list_models("cnn*")
    with pytest.raises(ValueError, match="no published weights"):
        timm.create_model("cnn5", pretrained=True)
