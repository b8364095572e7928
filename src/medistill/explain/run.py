"""``medistill explain``: maps, faithfulness, agreement and explanation time for every model of a run."""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
import torch.nn.functional as F
from torch import nn

from medistill.device import resolve_device, synchronize
from medistill.data import build_data
from medistill.errors import ArgumentError
from medistill.explain import cam as C
from medistill.explain import metrics as M
from medistill.io import write_json, write_text
from medistill.models.factory import data_size, load_model_dir
from medistill.models.taps import list_taps
from medistill.plots import overlay_figure, save_png
from medistill.models.modes import eval_mode
from medistill.progress import steps
from medistill.rundir import (
    is_ensemble_dir,
    load_run_config,
    read_ensemble,
    read_run_json,
    resolve_teacher,
    student_dirs,
)

METHODS = ("gradcam", "gradcampp", "layercam", "scorecam", "avgmap", "shap")


def shap_map(model: nn.Module, x: torch.Tensor, cls: torch.Tensor, background: torch.Tensor, n_samples: int = 16) -> torch.Tensor:
    """GradientShap (captum) attribution, |·| summed over colour channels, min-max → ``[B, H, W]``.
    The background is a fixed set of training images (see ``explain_run``)."""
    from captum.attr import GradientShap

    with eval_mode(model):
        attr = GradientShap(model).attribute(x, baselines=background, target=cls, n_samples=n_samples, stdevs=0.09)
    return C.minmax(attr.abs().sum(1).detach())


def _methods(layer: str, top_k: int | None, background: torch.Tensor) -> dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]]:
    return {
        "gradcam": lambda m, x, c: C.grad_cam(m, x, layer, c),
        "gradcampp": lambda m, x, c: C.grad_cam_pp(m, x, layer, c),
        "layercam": lambda m, x, c: C.layer_cam(m, x, layer, c),
        "scorecam": lambda m, x, c: C.score_cam(m, x, layer, c, variant="original", top_k_channels=top_k or None),
        "avgmap": lambda m, x, c: C.average_feature_maps(m, x, [layer])[layer],
        "shap": lambda m, x, c: shap_map(m, x, c, background),
    }


def _pick(labels: np.ndarray, idx: np.ndarray, n: int, per_class: int | None, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if per_class:
        out = [rng.permutation(idx[labels == c])[:per_class] for c in np.unique(labels)]
        return np.concatenate(out)
    return rng.permutation(idx)[:n]


def _images(bundle: Any, split: str, n_images: int, per_class: int | None, seed: int
            ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images explained (indices, ``[N, C, S, S]``, labels) and 16 training images as SHAP's background."""
    chosen = _pick(bundle.labels(split), bundle.splits[split], n_images, per_class, seed)
    ds = bundle.dataset(split, train=False)
    pos = {int(i): k for k, i in enumerate(bundle.splits[split])}
    items = [ds[pos[int(i)]] for i in chosen]
    bg_ds = bundle.dataset("train", train=False)
    bg = torch.stack([bg_ds[i][0] for i in np.random.default_rng(seed).permutation(len(bg_ds))[:16]])
    return chosen, torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items]), bg


def _overlay_grid(images: np.ndarray, columns: dict[str, np.ndarray], labels: list[str], path: Path) -> None:
    save_png(overlay_figure(images, columns, labels), path, dpi=100)


def _check_choice(split: str, n_images: int, per_class: int | None) -> None:
    if split not in ("train", "val", "test"):
        raise ArgumentError(f"--split {split!r}: explain a run's train, val or test split")
    if n_images < 1 and not per_class:
        raise ArgumentError(f"--images {n_images}: explain at least one image")
    if per_class is not None and per_class < 1:
        raise ArgumentError(f"--per-class {per_class}: explain at least one image per class")


def explain_run(run_dir: str | Path, n_images: int = 8, per_class: int | None = None, methods: list[str] | None = None,
                split: str = "test", top_k: int | None = None, seed: int = 0, out: str | Path | None = None,
                layers: dict[str, str] | None = None, compare: dict[str, str | Path] | None = None,
                device: str = "auto", progress: bool = True, console: Any = None) -> dict[str, Any]:
    """``layers`` maps a participant name to the module its CAMs use (default: the deepest top-level
    module with a map of at least 2×2 — at small inputs that map is coarse, e.g. 2×2 at 64 px).
    ``compare`` adds models from elsewhere (name → model or run directory), e.g. a student trained
    without a teacher: its agreement with the teachers is the baseline a distilled student's is
    judged against. Every model, map and masked forward runs on ``device``. ``top_k``: Score-CAM's
    channels (None: :data:`AUTO_TOP_K` where it agrees with the exact map, checked here; 0: all).
    ``progress`` shows a bar with the time left (on ``console``, default stderr)."""
    run_dir = Path(run_dir)
    cam_layers = dict(layers or {})
    methods = list(methods or ["gradcam", "scorecam", "avgmap"])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ArgumentError(f"unknown explanation method(s) {unknown}; available: {', '.join(METHODS)}")
    _check_choice(split, n_images, per_class)
    dev = resolve_device(device)
    out = Path(out) if out else run_dir / "explain"
    if not student_dirs(run_dir) and not compare:
        raise ArgumentError(f"{run_dir}: no students to explain (no students/NAME/model.json); is it a finished run?")
    cfg = load_run_config(run_dir)
    bundle = build_data(cfg.data, fixed_splits=read_run_json(run_dir / "split.json"), open_pool=False)
    models = _load_models(run_dir, cfg.teachers, dict(compare or {}), cam_layers)
    bundle = replace(bundle, image_size=data_size(bundle.source.native_size, [s for *_, s in models.values()],
                                                     not bundle.source.in_memory))
    chosen, x, y, bg = _images(bundle, split, n_images, per_class, seed)
    x, bg = x.to(dev), bg.to(dev)
    report: dict[str, Any] = {"split": split, "images": chosen.tolist(), "labels": y.tolist(), "device": str(dev),
                              "threads": torch.get_num_threads(), "scorecam_variant": "original",
                              "top_k_channels": "auto" if top_k is None else top_k,
                              "deletion_baseline": "0 in normalised input space (the normalisation mean colour)",
                              "shap_background": "16 random training images (eval transform), GradientShap n_samples=16, stdev 0.09",
                              "fidelity": "prediction agreement of f(x ⊙ S) with f(x)", "models": {}}
    all_maps: dict[str, dict[str, torch.Tensor]] = {}
    images = x.permute(0, 2, 3, 1).cpu().numpy()
    titles = [bundle.class_names[int(v)] for v in y]
    con = console or Console(stderr=True)
    with steps(con, f"explain {len(x)} images", len(models) * len(methods), enabled=progress) as advance:
        for name, (role, model, pre, spec) in models.items():
            model.to(dev)
            pre.to(dev)
            entry, all_maps[name], per_layer = _explain_model(name, model, pre, spec, x, y, pre(bg), cam_layers.get(name),
                                                              methods, top_k, bundle.num_classes, advance,
                                                              lambda m: con.print(f"[yellow]note:[/] {m}"))
            entry["role"] = role
            _overlay_grid(images, per_layer, titles, out / f"layers_{name}.png")
            report["models"][name] = entry
    teachers = [n for n, (r, *_) in models.items() if r == "teacher"]
    if teachers:
        agree_all = {ref: _agreement(all_maps, ref, methods, y, bundle.num_classes) for ref in teachers}
        report["agreement_with"] = teachers[0]
        report["agreement"] = agree_all[teachers[0]]
        report["agreement_all"] = agree_all
    for meth in methods:
        _overlay_grid(images, {n: all_maps[n][meth].numpy() for n in models}, titles, out / f"grid_{meth}.png")
    write_json(out / "explain.json", report)
    write_text(out / "explain.md", explain_markdown(report))
    return report


Loaded = dict[str, tuple[str, nn.Module, nn.Module, Any]]


def _load_models(run_dir: Path, teachers: list[Any], compare: dict[str, str | Path], cam_layers: dict[str, str]) -> Loaded:
    """Every model to explain, name → (role, model, preprocess, spec): the run's teachers (an
    ensemble member by member), its students and the ``compare`` models; they must agree on the
    classes, and ``cam_layers`` may name only them."""
    models: Loaded = {}
    for t in teachers:
        tname, tdir = t.name, resolve_teacher(t.checkpoint)
        if is_ensemble_dir(tdir):   # an ensemble is explained member by member
            for i, row in enumerate(read_ensemble(tdir)["members"]):
                models[f"{tname}.{i}"] = ("teacher", *load_model_dir(tdir / row["model_dir"]))
            continue
        models[tname] = ("teacher", *load_model_dir(tdir))
    for d in student_dirs(run_dir):
        models[d.name] = ("student", *load_model_dir(d))
    for name, path in compare.items():
        if name in models:
            raise ArgumentError(f"--compare name {name!r} is already a model of this run; pick another")
        models[name] = ("compare", *load_model_dir(resolve_teacher(str(path))))
    counts = {n: s.num_classes for n, (*_, s) in models.items()}
    if len(set(counts.values())) > 1:
        raise ArgumentError(f"models disagree on the number of classes: {counts}")
    unknown = sorted(set(cam_layers) - set(models))
    if unknown:
        raise ArgumentError(f"--layer names unknown model(s) {unknown}; this run has {sorted(models)}")
    return models


# Score-CAM's default: the AUTO_TOP_K highest-variance channels where that map agrees with the
# exact one (Spearman ≥ AUTO_TOP_K_AGREEMENT on the first images of the run's own selection),
# else every channel. The exact map costs one masked forward per channel; most of them barely move it.
AUTO_TOP_K, AUTO_TOP_K_AGREEMENT, AUTO_TOP_K_IMAGES = 16, 0.9, 2


def _auto_top_k(model: nn.Module, xin: torch.Tensor, pred: torch.Tensor, layer: str, channels: int) -> dict[str, Any]:
    """Check top-k Score-CAM against the exact map on a few images; the k to use (0: exact)."""
    if channels <= AUTO_TOP_K:
        return {"k": 0, "reason": f"{channels} channels ≤ {AUTO_TOP_K}: exact"}
    n = min(AUTO_TOP_K_IMAGES, len(xin))
    exact = C.score_cam(model, xin[:n], layer, pred[:n], variant="original")
    fast = C.score_cam(model, xin[:n], layer, pred[:n], variant="original", top_k_channels=AUTO_TOP_K)
    rho = float(M.map_agreement(exact, fast)["spearman"].mean())
    ok = rho >= AUTO_TOP_K_AGREEMENT
    return {"k": AUTO_TOP_K if ok else 0, "spearman_vs_exact": rho, "images_checked": n,
            "reason": (f"top-{AUTO_TOP_K} of {channels} channels agrees with the exact map (Spearman {rho:.3f} ≥ "
                       f"{AUTO_TOP_K_AGREEMENT})") if ok else
                      f"top-{AUTO_TOP_K} disagrees with the exact map (Spearman {rho:.3f} < {AUTO_TOP_K_AGREEMENT}): exact"}


def _explain_model(name: str, model: nn.Module, pre: nn.Module, spec: Any, x: torch.Tensor, y: torch.Tensor, background: torch.Tensor,
                   layer: str | None, methods: list[str], top_k: int | None, num_classes: int,
                   advance: Callable[[str], None] = lambda _: None, say: Callable[[str], None] = lambda _: None,
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """One model's maps ``[B, H, W]`` (CPU, image size) per method, their faithfulness and time
    per image, and its per-layer average maps for the layer figure; ``say`` announces a slow
    Score-CAM (every channel) before it runs."""
    xin = pre(x)
    size = tuple(x.shape[-2:])
    layer = layer or C.default_target_layer(model, spec.input_size, spec.in_chans)
    # one shape-probing forward serves the CAM layer, the error message and the per-layer maps
    spatial = {n: sh for n, sh in list_taps(model, spec.input_size, spec.in_chans, max(2, layer.count(".") + 1))
               if len(sh) == 4}
    if layer not in spatial:
        raise ArgumentError(f"{name}: layer {layer!r} is not a module with a "
                            f"spatial [B, C, H, W] output; candidates: {[n for n in spatial if n.count('.') < 2]}")
    h, w = spatial[layer][-2:]
    if h <= 2 and w <= 2:
        warnings.warn(f"{name}: the CAM layer {layer!r} has a {h}×{w} map, too coarse to localise anything; pick an "
                      f"earlier layer with --layer {name}=MODULE (`medistill models taps {spec.arch} --input-size "
                      f"{spec.input_size}` lists them)", stacklevel=2)
    with torch.no_grad():
        pred = model.eval()(xin).argmax(1)
    entry: dict[str, Any] = {"target_layer": layer, "target_map": [h, w], "methods": {}}
    if "scorecam" in methods and top_k is None:
        entry["scorecam_top_k"] = _auto_top_k(model, xin, pred, layer, spatial[layer][1])
        top_k = entry["scorecam_top_k"]["k"]
        if top_k == 0 and spatial[layer][1] > AUTO_TOP_K:
            say(f"{name}: Score-CAM on all {spatial[layer][1]} channels of {layer} "
                f"({entry['scorecam_top_k']['reason']}): {spatial[layer][1]} masked forwards per image × {len(x)} "
                "images; --top-k 16 trades exactness for time")
    fns = _methods(layer, top_k, background)
    maps_out: dict[str, torch.Tensor] = {}
    for meth in methods:
        fn = fns[meth]
        fn(model, xin[:1], pred[:1])                               # warm-up, discarded
        synchronize(x.device)
        t0 = time.perf_counter()
        maps = fn(model, xin, pred)
        synchronize(x.device)
        met = (time.perf_counter() - t0) / len(x)
        cc = M.confidence_change(model, xin, maps)
        entry["methods"][meth] = {
            "met_s_per_image": met,
            "deletion_auc": M.per_class(M.deletion_auc(model, xin, maps).cpu(), y, num_classes),
            "insertion_auc": M.per_class(M.insertion_auc(model, xin, maps).cpu(), y, num_classes),
            "fidelity": M.prediction_fidelity(model, xin, maps),
            "average_drop": M.per_class(cc["drop"].cpu(), y, num_classes),
            "increase_in_confidence": M.per_class(cc["increase"].cpu(), y, num_classes)}
        maps_out[meth] = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].cpu()
        advance(f"{name} {meth}")
    per_layer = C.average_feature_maps(model, xin, [n for n in spatial if "." not in n])
    layer_maps = {k: F.interpolate(v[:, None], size=size, mode="bilinear")[:, 0].cpu().numpy() for k, v in per_layer.items()}
    return entry, maps_out, layer_maps


def _agreement(maps: dict[str, dict[str, torch.Tensor]], ref: str, methods: list[str], y: torch.Tensor,
               num_classes: int) -> dict[str, Any]:
    """Top-20 % IoU and Spearman of every other model's maps with teacher ``ref``'s, per class."""
    return {name: {meth: {k: M.per_class(v, y, num_classes)
                          for k, v in M.map_agreement(maps[ref][meth], maps[name][meth]).items()}
                   for meth in methods}
            for name in maps if name != ref}


def explain_markdown(r: dict[str, Any]) -> str:
    lines = ["# Explanations", "", f"{len(r['images'])} {r['split']} images; {_device_text(r)}; "
             f"fidelity = {r['fidelity']}; deletion/insertion baseline = {r['deletion_baseline']}.", "",
             "| model | method | layer | MET (ms/img) | fidelity | deletion AUC ↓ (macro) | insertion AUC ↑ (macro) | avg drop ↓ |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in r["models"].items():
        for meth, v in e["methods"].items():
            lines.append(f"| {name} | {meth} | {e['target_layer']} ({'×'.join(map(str, e.get('target_map', [])))}) | {1e3 * v['met_s_per_image']:.1f} | {v['fidelity']:.3f} | "
                         f"{v['deletion_auc']['macro']:.3f} | {v['insertion_auc']['macro']:.3f} | {v['average_drop']['macro']:.3f} |")
    checks = [f"{n}: {e['scorecam_top_k']['reason']}" for n, e in r["models"].items() if e.get("scorecam_top_k")]
    if checks:
        lines += ["", "Score-CAM channels (top-k where it agrees with the exact map on these images): " + "; ".join(checks) + "."]
    roles = {n: e["role"] for n, e in r["models"].items()}
    for ref, agree in r.get("agreement_all", {}).items():
        lines += ["", f"## Agreement with teacher {ref} (macro over classes; two random top-20% masks: IoU ≈ 0.11)", "",
                  "| model | role | method | top-20% IoU | Spearman |", "|---|---|---|---|---|"]
        for name, d in agree.items():
            for meth, v in d.items():
                lines.append(f"| {name} | {roles.get(name, '')} | {meth} | {v['iou']['macro']:.3f} | {v['spearman']['macro']:.3f} |")
    return "\n".join(lines) + "\n"


def _device_text(r: dict[str, Any]) -> str:
    dev = r.get("device", "cpu")
    return f"CPU, {r['threads']} threads" if dev == "cpu" else dev
