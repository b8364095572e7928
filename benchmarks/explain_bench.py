"""Explanation cost and fidelity: MET of Score-CAM (full, top-k), Grad-CAM, average maps and SHAP
on a ResNet-50 teacher and ResNet-18 / cnn5 students at 28 px (RetinaMNIST); our Score-CAM vs
pytorch-grad-cam's ScoreCAM (same model, layer, images): time ratio and max map difference;
teacher–student agreement per grade for the KD student of retinamnist_kd.py.

    python benchmarks/explain_bench.py [--images 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, machine, save
from medistill.config import DataConfig
from medistill.data import build_data
from medistill.explain import average_feature_maps, grad_cam, score_cam
from medistill.explain.run import explain_run, shap_map
from medistill.models import create_model, load_model_dir


def timed(fn, x: torch.Tensor) -> tuple[float, object]:
    """Seconds for ``fn(x)`` after a discarded one-image warm-up call, and its output."""
    fn(x[:1])
    t0 = time.perf_counter()
    out = fn(x)
    return time.perf_counter() - t0, out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(np.mean([spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a.numpy(), b.numpy())]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--runs", default=str(RESULTS / "runs"))
    a = ap.parse_args()
    runs = Path(a.runs)
    data = build_data(DataConfig(name="retinamnist"))
    ds = data.dataset("test", train=False)
    x = torch.stack([ds[i][0] for i in range(a.images)])
    models = {}
    if (runs / "teacher_resnet50" / "students" / "resnet50").is_dir():
        m, pre, _ = load_model_dir(runs / "teacher_resnet50" / "students" / "resnet50")
        models["resnet50 (teacher)"] = (m, pre, "layer4")
    if (runs / "kd_s0" / "students" / "resnet18").is_dir():
        m, pre, _ = load_model_dir(runs / "kd_s0" / "students" / "resnet18")
        models["resnet18 (KD student)"] = (m, pre, "layer4")
    cnn = create_model("cnn5", 5, 3, 28).eval()
    models["cnn5 (untrained; timing only)"] = (cnn, lambda t: (t - 0.5) / 0.5, "conv5")
    bg = torch.stack([data.dataset("train", False)[i][0] for i in range(16)])
    rows = []
    for name, (m, pre, layer) in models.items():
        xin = pre(x)
        k = dict(m.named_modules())[layer]
        with torch.no_grad():
            from medistill.models import FeatureTaps

            with FeatureTaps(m, [layer]) as tp:
                m(xin[:1])
            channels = tp[layer].shape[1]
        top_k = max(1, channels // 8)
        t_full, full = timed(lambda v: score_cam(m, v, layer), xin)
        t_top, top = timed(lambda v: score_cam(m, v, layer, top_k_channels=top_k), xin)
        t_gc, _ = timed(lambda v: grad_cam(m, v, layer), xin)
        t_avg, _ = timed(lambda v: average_feature_maps(m, v, [layer]), xin)
        t_shap, _ = timed(lambda v: shap_map(m, v, m(v).argmax(1), pre(bg)), xin)
        row = {"model": name, "layer": layer, "channels": channels, "images": len(x),
               "met_ms": {"scorecam_full": 1e3 * t_full / len(x), f"scorecam_top{top_k}": 1e3 * t_top / len(x),
                          "gradcam": 1e3 * t_gc / len(x), "avgmap": 1e3 * t_avg / len(x), "shap_gradientshap": 1e3 * t_shap / len(x)},
               "topk_spearman_to_full": spearman(top, full), "topk_speedup": t_full / t_top}
        if channels > 1024:
            rows.append(row)
            print(row, flush=True)
            continue  # the oracle comparison on 2048 channels does not fit the session; smaller models below
        try:
            from pytorch_grad_cam import ScoreCAM
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            cls = m(xin).argmax(1).tolist()
            ours_t, ours = timed(lambda v: score_cam(m, v, layer, class_idx=torch.tensor(cls[:len(v)]), variant="logit_softmax"), xin)

            def theirs(v):
                with ScoreCAM(model=m, target_layers=[k]) as cam:
                    cam.batch_size = 64
                    return cam(input_tensor=v, targets=[ClassifierOutputTarget(c) for c in cls[:len(v)]])
            their_t, ref = timed(theirs, xin)
            row["vs_pytorch_grad_cam"] = {"ours_ms": 1e3 * ours_t / len(x), "theirs_ms": 1e3 * their_t / len(x),
                                          "time_ratio_ours_over_theirs": ours_t / their_t,
                                          "max_abs_map_diff": float(np.abs(ours.numpy() - ref).max()),
                                          "spearman": spearman(ours, torch.from_numpy(ref))}
        except ImportError:
            pass
        rows.append(row)
        print(row, flush=True)
    # 224 px (LC25000): randomly initialised ResNet-18 (timing only; maps of an untrained model mean nothing)
    lc = build_data(DataConfig(name="lc25000-lung"))
    lds = lc.dataset("test", train=False)
    x224 = torch.stack([lds[i][0] for i in range(2)])
    r18 = create_model("resnet18", 3, 3, 224).eval()
    xin = (x224 - 0.5) / 0.5
    t_full, full = timed(lambda v: score_cam(r18, v, "layer4"), xin)
    t_top, top = timed(lambda v: score_cam(r18, v, "layer4", top_k_channels=64), xin)
    t_gc, _ = timed(lambda v: grad_cam(r18, v, "layer4"), xin)
    t_avg, _ = timed(lambda v: average_feature_maps(r18, v, ["layer4"]), xin)
    bg224 = (torch.stack([lc.dataset("train", False)[i][0] for i in range(8)]) - 0.5) / 0.5
    t_shap, _ = timed(lambda v: shap_map(r18, v, r18(v).argmax(1), bg224), xin)
    rows.append({"model": "resnet18 @224 px (untrained; timing only)", "layer": "layer4", "channels": 512, "images": 2,
                 "met_ms": {"scorecam_full": 1e3 * t_full / 2, "scorecam_top64": 1e3 * t_top / 2, "gradcam": 1e3 * t_gc / 2,
                            "avgmap": 1e3 * t_avg / 2, "shap_gradientshap": 1e3 * t_shap / 2},
                 "topk_spearman_to_full": spearman(top, full), "topk_speedup": t_full / t_top})
    print(rows[-1], flush=True)
    result = {"machine": machine(), "rows": rows}
    if (runs / "kd_s0" / "summary.json").is_file():
        rep = explain_run(runs / "kd_s0", per_class=4, methods=["gradcam", "scorecam", "avgmap"], top_k=64,
                          out=RESULTS / "explain_kd_s0")
        result["agreement_kd_s0"] = rep["agreement"]
        result["faithfulness_kd_s0"] = {n: {m: {k: v[k] for k in ("met_s_per_image", "fidelity")} | {
            "deletion_macro": v["deletion_auc"]["macro"], "insertion_macro": v["insertion_auc"]["macro"]}
            for m, v in e["methods"].items()} for n, e in rep["models"].items()}
    save("explain", result)


if __name__ == "__main__":
    main()
