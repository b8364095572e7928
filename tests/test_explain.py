"""Explanations: analytic toy model (methods.md C.8), invariances (D.9), forward-call counts,
fidelity, and agreement with pytorch-grad-cam as an oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medistill.explain import (average_feature_maps, deletion_auc, grad_cam, grad_cam_pp, insertion_auc, layer_cam,
                               map_agreement, prediction_fidelity, score_cam, tokens_to_map)

EXPECTED = torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]])


class Toy(nn.Module):
    """C.8: a 1×1 conv with weights [1, −1] and biases [0, 5]; logit_0 = spatial sum of channel 0, logit_1 = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        return torch.stack([a[:, 0].sum((1, 2)), torch.zeros(x.shape[0])], 1)


@pytest.mark.parametrize("variant", ["original", "logit_softmax"])
def test_score_cam_toy(variant: str) -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    cam = score_cam(Toy(), x, "conv", class_idx=0, variant=variant)
    assert torch.allclose(cam[0], EXPECTED, atol=1e-6)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def test_score_cam_forward_count_range_and_mode_restore() -> None:
    m = _cnn().train()
    calls = []
    h = m.register_forward_pre_hook(lambda mod, inp: calls.append(inp[0].shape[0]))
    x = torch.randn(3, 3, 12, 12)
    cam = score_cam(m, x, "4", batch_size=4)
    h.remove()
    k_valid = 6  # ReLU maps can be constant (all zero); those channels are skipped
    assert len(calls) >= 1 and len(calls) <= 1 + math.ceil(3 * k_valid / 4)
    assert sum(calls) <= 3 + 3 * k_valid
    assert cam.shape == (3, 12, 12) and float(cam.min()) == 0.0 and float(cam.max()) == 1.0
    assert m.training and all(m_.training for m_ in m.modules())
    assert all(len(mod._forward_hooks) == 0 for mod in m.modules())


def test_score_cam_single_channel() -> None:
    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1, bias=False)
            nn.init.ones_(self.conv.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([self.conv(x).sum((1, 2, 3)), torch.zeros(x.shape[0])], 1)

    x = torch.rand(2, 1, 5, 5)
    cam = score_cam(One(), x, "conv", class_idx=0)
    ref = x[:, 0].relu()
    ref = (ref - ref.amin((1, 2), keepdim=True)) / (ref.amax((1, 2), keepdim=True) - ref.amin((1, 2), keepdim=True))
    assert torch.allclose(cam, ref, atol=1e-6)


def _score_cam_naive(model: nn.Module, x: torch.Tensor, layer: nn.Module, channels: list[list[int]]) -> torch.Tensor:
    """Score-CAM ("original") one image and one channel at a time, over the given channels only."""
    acts = []
    h = layer.register_forward_hook(lambda m, i, o: acts.append(o.detach()))
    with torch.no_grad():
        cls = model(x).argmax(1)
    h.remove()
    a = acts[0]
    out = []
    for b in range(x.shape[0]):
        cam = torch.zeros(x.shape[-2:])
        for k in channels[b]:
            up = torch.nn.functional.interpolate(a[b:b + 1, k:k + 1], size=x.shape[-2:], mode="bilinear",
                                                 align_corners=False)[0, 0]
            if up.max() == up.min():
                continue
            mask = (up - up.min()) / (up.max() - up.min())
            with torch.no_grad():
                p = torch.softmax(model(x[b:b + 1] * mask), 1)[0, cls[b]]
            cam += p * up
        cam = cam.relu()
        out.append((cam - cam.min()) / (cam.max() - cam.min()))
    return torch.stack(out)


def test_top_k_against_naive_reference() -> None:
    """k < K: only the k channels of largest activation variance contribute, per image."""
    m = _cnn().eval()
    x = torch.randn(3, 3, 12, 12)
    acts = []
    h = m[4].register_forward_hook(lambda mod, i, o: acts.append(o.detach()))
    with torch.no_grad():
        m(x)
    h.remove()
    k = 3
    assert acts[0].shape[1] == 6 > k
    top = acts[0].flatten(2).var(2).topk(k, 1).indices.tolist()
    got = score_cam(m, x, "4", top_k_channels=k, batch_size=5)
    assert torch.allclose(got, _score_cam_naive(m, x, m[4], top), atol=1e-5)
    # and the top-k map differs from the full one: the branch changed something
    full = score_cam(m, x, "4")
    assert torch.allclose(full, _score_cam_naive(m, x, m[4], [list(range(6))] * 3), atol=1e-5)
    assert not torch.allclose(full, got, atol=1e-3)


def test_fidelity_counts_changed_predictions() -> None:
    """A mask that flips the prediction of exactly the images chosen counts those as unfaithful."""
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    m = nn.Sequential(nn.Flatten(), lin)
    x = torch.tensor([[2.0, 1.0, 0.0, 0.0]] * 4).view(4, 1, 2, 2)   # every image predicts class 0
    keep = torch.ones(4, 2, 2)
    flip = torch.tensor([[0.1, 1.0], [1.0, 1.0]])                   # class 0 evidence × 0.1 → class 1 wins
    s = torch.stack([keep[0], flip, keep[0], flip])
    assert prediction_fidelity(m, x, s) == 0.5
    assert prediction_fidelity(m, x, torch.stack([flip] * 4)) == 0.0


def test_average_maps_invariances() -> None:
    g = torch.rand(1, 1, 6, 6)

    class Rep(nn.Module):
        def __init__(self, perm: list[int], scale: float) -> None:
            super().__init__()
            self.feat = nn.Identity()
            self.perm, self.scale = perm, scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.feat(torch.cat([x * (i + 1) for i in range(3)], 1)[:, self.perm] * self.scale)
            return f.mean((2, 3))

    a = average_feature_maps(Rep([0, 1, 2], 1.0), g, ["feat"])["feat"]
    b = average_feature_maps(Rep([2, 0, 1], 3.0), g, ["feat"])["feat"]
    ref = (g[:, 0] - g.min()) / (g.max() - g.min() + 1e-8)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, ref, atol=1e-5)


def test_grad_cam_is_cam_on_gap_linear_head() -> None:
    torch.manual_seed(1)
    conv, fc = nn.Conv2d(3, 5, 3, padding=1), nn.Linear(5, 3)
    m = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    x = torch.randn(2, 3, 8, 8)
    cam = grad_cam(m, x, "1", class_idx=2)
    with torch.no_grad():
        a = torch.relu(conv(x))
        ref = torch.relu((fc.weight[2][None, :, None, None] * a).sum(1))
        ref = (ref - ref.amin((1, 2), keepdim=True)) / (ref.amax((1, 2), keepdim=True) - ref.amin((1, 2), keepdim=True))
    assert torch.allclose(cam, ref, atol=1e-5)


@pytest.mark.parametrize("ours,theirs", [("grad_cam", "GradCAM"), ("grad_cam_pp", "GradCAMPlusPlus"), ("layer_cam", "LayerCAM")])
def test_gradient_cams_match_pytorch_grad_cam(ours: str, theirs: str) -> None:
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    m = _cnn().eval()
    x = torch.randn(3, 3, 16, 16)
    fn = {"grad_cam": grad_cam, "grad_cam_pp": grad_cam_pp, "layer_cam": layer_cam}[ours]
    mine = fn(m, x, "4", class_idx=1).numpy()
    with getattr(pgc, theirs)(model=m, target_layers=[m[4]]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)] * 3)
    for a, b in zip(mine, ref):
        if b.std() > 0:
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_score_cam_matches_pytorch_grad_cam() -> None:
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    m = _cnn().eval()
    x = torch.randn(2, 3, 16, 16)
    mine = score_cam(m, x, "4", class_idx=0, variant="logit_softmax").numpy()
    with pgc.ScoreCAM(model=m, target_layers=[m[4]]) as cam:
        cam.batch_size = 16
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * 2)
    for a, b in zip(mine, ref):
        if b.std() > 0:
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_deletion_insertion_rank_a_true_saliency_higher() -> None:
    class Spot(nn.Module):
        """Class 0 score is the mean of the top-left quadrant."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x[:, :, :4, :4].mean((1, 2, 3)) * 10
            return torch.stack([s, torch.zeros_like(s)], 1)

    x = torch.ones(2, 3, 8, 8)
    good = torch.zeros(2, 8, 8)
    good[:, :4, :4] = 1
    bad = 1 - good
    m = Spot()
    assert (deletion_auc(m, x, good + 0.01 * torch.rand(2, 8, 8), class_idx=0) <
            deletion_auc(m, x, bad + 0.01 * torch.rand(2, 8, 8), class_idx=0)).all()
    assert (insertion_auc(m, x, good + 0.01 * torch.rand(2, 8, 8), class_idx=0) >
            insertion_auc(m, x, bad + 0.01 * torch.rand(2, 8, 8), class_idx=0)).all()


def test_deletion_insertion_curves_equal_a_step_by_step_reference(monkeypatch) -> None:
    """The batched curves (steps chunked through the model) against the plain loop: one forward
    per step, pixels ranked by saliency, the trapezoid over [0, 1]; with a chunk that does not
    divide the steps, so the chunk boundaries are crossed."""
    import medistill.explain.metrics as M

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x, sal = torch.randn(2, 3, 6, 6), torch.rand(2, 6, 6)

    def reference(insert: bool, steps: int = 7) -> torch.Tensor:
        cls = m(x).argmax(1)
        order = sal.flatten(1).argsort(1, descending=True)
        curve = []
        for i in range(steps + 1):
            keep = torch.zeros(2, 36, dtype=torch.bool)
            for b in range(2):
                keep[b, order[b, :round(i * 36 / steps)]] = True
            keep = keep.view(2, 1, 6, 6)
            xi = torch.where(keep, x, torch.zeros_like(x)) if insert else torch.where(keep, torch.zeros_like(x), x)
            curve.append(torch.softmax(m(xi), 1)[torch.arange(2), cls])
        c = torch.stack(curve, 1)
        return ((c[:, 1:] + c[:, :-1]) / 2).sum(1) / steps

    monkeypatch.setattr(M, "_CURVE_BATCH", 6)     # 3 steps of 2 images per forward: 8 steps = 3 chunks
    with torch.no_grad():
        assert torch.allclose(deletion_auc(m, x, sal, steps=7), reference(False), atol=1e-6)
        assert torch.allclose(insertion_auc(m, x, sal, steps=7), reference(True), atol=1e-6)


def test_agreement_and_tokens() -> None:
    a = torch.rand(3, 8, 8)
    r = map_agreement(a, a.clone())
    assert torch.allclose(r["iou"], torch.ones(3)) and torch.allclose(r["spearman"], torch.ones(3), atol=1e-6)
    from scipy.stats import spearmanr

    b = torch.rand(3, 8, 8)
    r = map_agreement(a, b)
    assert abs(float(r["spearman"][0]) - spearmanr(a[0].ravel(), b[0].ravel())[0]) < 1e-5
    t = torch.randn(2, 17, 4)
    assert tokens_to_map(t).shape == (2, 4, 4, 4)
