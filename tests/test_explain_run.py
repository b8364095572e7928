from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY_CNN, run_engine, tiny_cfg
from medistill.explain.run import explain_run


def test_explain_run_end_to_end(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    cfg = tiny_cfg(data_dir / "tiny.npz", tmp_path / "run", epochs=1)
    cfg["teachers"] = [{"name": "t0", "checkpoint": str(teachers[0])}]
    cfg["students"] = [{"name": "s", "model": "cnn5", "kwargs": TINY_CNN}]
    cfg["terms"] = [{"type": "ce"}, {"type": "kd"}]
    run_engine(cfg)
    rep = explain_run(tmp_path / "run", per_class=2, methods=["gradcam", "scorecam", "avgmap", "shap"])
    out = tmp_path / "run" / "explain"
    assert (out / "explain.json").is_file() and (out / "explain.md").is_file()
    for m in ("gradcam", "scorecam", "avgmap", "shap"):
        assert (out / f"grid_{m}.png").stat().st_size > 1000
    assert (out / "layers_s.png").is_file() and (out / "layers_t0.png").is_file()
    r = json.loads((out / "explain.json").read_text())
    assert set(r["models"]) == {"t0", "s"} and len(r["images"]) == 6
    e = r["models"]["s"]["methods"]["scorecam"]
    assert e["met_s_per_image"] > 0 and 0 <= e["fidelity"] <= 1 and len(e["deletion_auc"]["per_class"]) == 3
    assert set(r["agreement"]["s"]) == {"gradcam", "scorecam", "avgmap", "shap"}
    assert rep["models"]["t0"]["target_layer"] == "conv4"  # conv5 is 1×1 at 16 px; the deepest ≥ 2×2 map is chosen
    assert rep["models"]["t0"]["target_map"] == [2, 2]


def test_explain_run_layer_choice(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    import pytest

    cfg = tiny_cfg(data_dir / "tiny.npz", tmp_path / "run", epochs=1)
    cfg["teachers"] = [{"name": "t0", "checkpoint": str(teachers[0])}]
    cfg["students"] = [{"name": "s", "model": "cnn5", "kwargs": TINY_CNN}]
    cfg["terms"] = [{"type": "kd"}]
    run_engine(cfg)
    rep = explain_run(tmp_path / "run", n_images=2, methods=["gradcam"], layers={"s": "conv3"})
    assert rep["models"]["s"]["target_layer"] == "conv3" and rep["models"]["s"]["target_map"] == [4, 4]
    assert rep["models"]["t0"]["target_layer"] == "conv4"
    with pytest.raises(ValueError, match="unknown model"):
        explain_run(tmp_path / "run", n_images=2, methods=["gradcam"], layers={"nobody": "conv3"})
    with pytest.raises(ValueError, match="not a module with a spatial"):
        explain_run(tmp_path / "run", n_images=2, methods=["gradcam"], layers={"s": "no_such_layer"})


def test_explain_run_compare_and_every_teacher(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    """A model from elsewhere (a student trained alone) is explained beside the run's models, and
    agreement is reported against every teacher."""
    import pytest

    cfg = tiny_cfg(data_dir / "tiny.npz", tmp_path / "run", epochs=1)
    cfg["teachers"] = [{"name": "t0", "checkpoint": str(teachers[0])}, {"name": "t1", "checkpoint": str(teachers[1])}]
    cfg["students"] = [{"name": "s", "model": "cnn5", "kwargs": TINY_CNN}]
    cfg["terms"] = [{"type": "kd"}]
    run_engine(cfg)
    rep = explain_run(tmp_path / "run", n_images=3, methods=["gradcam"], compare={"alone": teachers[1]})
    assert rep["models"]["alone"]["role"] == "compare"
    assert set(rep["agreement_all"]) == {"t0", "t1"} and set(rep["agreement_all"]["t1"]) == {"t0", "s", "alone"}
    assert rep["agreement"] == rep["agreement_all"]["t0"]
    # t1 and "alone" are the same weights: identical maps agree perfectly
    assert rep["agreement_all"]["t1"]["alone"]["gradcam"]["iou"]["macro"] == pytest.approx(1.0)
    md = (tmp_path / "run" / "explain" / "explain.md").read_text()
    assert "## Agreement with teacher t0" in md and "## Agreement with teacher t1" in md and "| alone | compare |" in md
    with pytest.raises(ValueError, match="already a model"):
        explain_run(tmp_path / "run", n_images=2, methods=["gradcam"], compare={"s": teachers[1]})
    from conftest import write_npz

    four = tiny_cfg(write_npz(tmp_path / "four.npz", counts=(10, 10, 10, 10)), tmp_path / "four", epochs=1)
    run_engine(four)
    with pytest.raises(ValueError, match="number of classes"):
        explain_run(tmp_path / "run", n_images=2, methods=["gradcam"], compare={"four": tmp_path / "four"})


def test_scorecam_top_k_auto_is_checked_against_the_exact_map(monkeypatch) -> None:
    """The default Score-CAM keeps AUTO_TOP_K channels only where that map agrees with the exact
    one on the run's own images; the check and its outcome are recorded."""
    import torch
    from torch import nn

    from medistill.explain import run as R

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 3)).eval()
    x = torch.rand(3, 3, 8, 8)
    pred = net(x).argmax(1)
    got = R._auto_top_k(net, x, pred, "1", 24)
    assert got["images_checked"] == 2 and 0.0 <= got["spearman_vs_exact"] <= 1.0 + 1e-9
    assert got["k"] == (R.AUTO_TOP_K if got["spearman_vs_exact"] >= R.AUTO_TOP_K_AGREEMENT else 0)
    monkeypatch.setattr(R, "AUTO_TOP_K_AGREEMENT", 1.01)        # an unreachable bar: exact maps
    assert R._auto_top_k(net, x, pred, "1", 24)["k"] == 0
    assert R._auto_top_k(net, x, pred, "1", 8)["k"] == 0         # few channels: exact anyway


def test_a_coarse_cam_map_is_warned_about() -> None:
    from types import SimpleNamespace

    import pytest
    import torch
    from torch import nn

    from medistill.explain import run as R

    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2)).eval()
    x = torch.rand(2, 3, 4, 4)
    spec = SimpleNamespace(arch="tiny", input_size=4, in_chans=3)
    with pytest.warns(UserWarning, match="2×2 map"):
        entry, *_ = R._explain_model("tiny", net, nn.Identity(), spec, x, torch.tensor([0, 1]), x, "1", ["gradcam"],
                                     None, 2)
    assert entry["target_map"] == [2, 2]
