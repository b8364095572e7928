"""Export (ONNX, TorchScript), prediction on image files, and the HTML report in a real browser."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CNN, run_engine, tiny_cfg
from medistill.commands.deploy import export_model, predict_files
from medistill.report import build_report


@pytest.fixture(scope="module")
def distill_run(data_dir: Path, teachers: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kdrun") / "run"
    cfg = tiny_cfg(data_dir / "tiny.npz", out, epochs=2, latency=True)
    cfg["teachers"] = [{"name": "t0", "checkpoint": str(teachers[0])}]
    cfg["students"] = [{"name": "s", "model": "cnn5", "kwargs": TINY_CNN}]
    cfg["terms"] = [{"type": "ce"}, {"type": "kd", "sample_weight": "entropy"}]
    run_engine(cfg)
    from medistill.explain.run import explain_run

    explain_run(out, n_images=4, methods=["gradcam", "avgmap"])
    return out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(distill_run: Path, fmt: str) -> None:
    r = export_model(distill_run, fmt)
    assert Path(r["path"]).is_file() and r["max_abs_diff"] < 1e-4


def test_predict_files_any_mode(distill_run: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for mode, shape in (("RGB", (40, 30, 3)), ("L", (16, 16)), ("RGBA", (20, 20, 4))):
        p = tmp_path / f"{mode}.png"
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(p)
        paths.append(p)
    res = predict_files(distill_run, paths, cam=True, out_dir=tmp_path)
    assert len(res) == 3 and all(abs(sum(r["probabilities"]) - 1) < 1e-4 for r in res)
    assert all(Path(r["cam"]).is_file() for r in res)
    onnx_path = export_model(distill_run, "onnx")["path"]
    res2 = predict_files(onnx_path, paths)
    for a, b in zip(res, res2):
        assert a["class"] == b["class"] and np.allclose(a["probabilities"], b["probabilities"], atol=1e-4)


def test_report_in_headless_browser(distill_run: Path, tmp_path: Path) -> None:
    path = build_report([distill_run])
    page = path.read_text()
    for section in ("id='models'", "id='curves'", "id='recall'", "id='confusion'", "id='calibration'", "id='explanations'"):
        assert section in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    comp = build_report([distill_run, distill_run], tmp_path / "cmp.html")
    assert "id='comparison'" in comp.read_text()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian package `chromium`); the report was checked as HTML only")
    shot = tmp_path / "report.png"
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    p = subprocess.run(base + ["--enable-logging=stderr", "--v=0", "--dump-dom", path.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Teacher vs students" in p.stdout and "Confusion matrices" in p.stdout
    console_errors = [ln for ln in p.stderr.splitlines() if "CONSOLE" in ln and "ERROR" in ln.upper()]
    assert not console_errors, console_errors
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,2400", path.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
    shutil.copy(shot, distill_run / "report_screenshot.png")


def test_predict_with_a_missing_model_names_it(tmp_path) -> None:
    import pytest

    from medistill.commands.deploy import predict_files
    from medistill.errors import ModelError

    for missing in (tmp_path / "gone.onnx", tmp_path / "no_run"):
        with pytest.raises(ModelError, match="nothing at .*expected a run, model or ensemble directory"):
            predict_files(missing, [tmp_path / "x.png"])
