"""Clinical evaluation: bootstrap intervals, operating points, grouped splits, folds, external
validation. Metrics are checked against scikit-learn on explicit resamples and fixed vectors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn import metrics as skm

from medistill.config import load_config
from medistill.data import build_data
from medistill.data import splits as sp
from medistill.errors import ConfigError, DataError
from medistill.eval import metrics as M


def _probs(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 1.5 * torch.nn.functional.one_hot(y, c)
    return torch.softmax(logits.double(), 1), y


# --- bootstrap -------------------------------------------------------------------------------------

def test_bootstrap_statistics_match_sklearn_on_explicit_resamples():
    p, y = _probs(120, 4, 0)
    p = p.numpy()
    y = y.numpy()
    p[:10, 0] = p[10:20, 0]     # ties in the scores
    w = M._resample_weights(y, 6, seed=3, stratified=True)
    stats = M.bootstrap_stats(p, y, w)
    for r in range(6):
        idx = np.repeat(np.arange(len(y)), w[r].astype(int))
        yr, pr = y[idx], p[idx]
        assert stats["accuracy"][r] == pytest.approx(skm.accuracy_score(yr, pr.argmax(1)))
        assert stats["balanced_accuracy"][r] == pytest.approx(skm.balanced_accuracy_score(yr, pr.argmax(1)))
        assert stats["macro_f1"][r] == pytest.approx(skm.f1_score(yr, pr.argmax(1), average="macro"))
        auc = np.mean([skm.roc_auc_score(yr == k, pr[:, k]) for k in range(4)])
        assert stats["auroc"][r] == pytest.approx(auc)
    # stratified: every resample keeps the class counts
    for k in range(4):
        assert np.allclose(w[:, y == k].sum(1), (y == k).sum())


def test_bootstrap_ci_is_seeded_and_contains_the_point_estimate():
    p, y = _probs(300, 3, 1)
    a = M.bootstrap_ci(p, y, 500, seed=7)
    b = M.bootstrap_ci(p, y, 500, seed=7)
    c = M.bootstrap_ci(p, y, 500, seed=8)
    assert a == b and a != c
    point = M.classification_metrics(p, y, ordinal=False)
    for k in M.CI_METRICS:
        lo, hi = a[k]
        assert lo < point[k] < hi, (k, lo, point[k], hi)
        assert hi - lo < 0.2


def test_auroc_ci_absent_with_one_class():
    p = torch.tensor([[0.7, 0.3], [0.6, 0.4]], dtype=torch.float64)
    ci = M.bootstrap_ci(p, torch.tensor([0, 0]), 50)
    assert ci["auroc"] is None and ci["accuracy"] == [1.0, 1.0]


# --- operating points --------------------------------------------------------------------------------

def test_binary_operating_point_against_sklearn():
    p, y = _probs(200, 2, 2)
    for thr in (None, 0.3, 0.7):
        op = M.binary_operating_point(p, y, thr)
        pred = p.argmax(1).numpy() if thr is None else (p[:, 1].numpy() >= thr).astype(int)
        yn = y.numpy()
        assert op["sensitivity"] == pytest.approx(skm.recall_score(yn, pred))
        assert op["specificity"] == pytest.approx(skm.recall_score(yn, pred, pos_label=0))
        assert op["ppv"] == pytest.approx(skm.precision_score(yn, pred))
        assert op["npv"] == pytest.approx(skm.precision_score(yn, pred, pos_label=0))
        assert op["f1"] == pytest.approx(skm.f1_score(yn, pred))
    assert M.auprc(p, y) == pytest.approx(skm.average_precision_score(y.numpy(), p[:, 1].numpy()))


def test_threshold_youden_and_target_sensitivity():
    p, y = _probs(150, 2, 4)
    t = M.choose_threshold(p, y)
    def j(thr: float) -> float:
        op = M.binary_operating_point(p, y, thr)
        return op["sensitivity"] + op["specificity"] - 1
    best = max(j(float(v)) for v in p[:, 1])
    assert j(t["value"]) == pytest.approx(best)
    t90 = M.choose_threshold(p, y, target_sensitivity=0.9)
    assert M.binary_operating_point(p, y, t90["value"])["sensitivity"] >= 0.9
    assert "0.9" in t90["rule"]


def test_per_class_sensitivity_specificity_and_ece():
    p, y = _probs(180, 3, 5)
    r = M.per_class_reliability(p, y, n_bins=10)
    pred = p.argmax(1).numpy()
    yn = y.numpy()
    assert r["per_class_sensitivity"] == pytest.approx(list(skm.recall_score(yn, pred, average=None)))
    for k in range(3):
        spec = ((pred != k) & (yn != k)).sum() / (yn != k).sum()
        assert r["per_class_specificity"][k] == pytest.approx(spec)
        # naive ECE of class k: loop over samples into 10 equal bins
        bins: dict[int, list[tuple[float, float]]] = {}
        for pk, yk in zip(p[:, k].tolist(), (yn == k).tolist()):
            bins.setdefault(min(int(pk * 10), 9), []).append((pk, float(yk)))
        ece = sum(len(v) / len(yn) * abs(np.mean([a for a, _ in v]) - np.mean([b for _, b in v])) for v in bins.values())
        assert r["per_class_ece"][k] == pytest.approx(ece)


# --- grouped splits and folds ------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 12), min_size=25, max_size=80),
       classes=st.integers(2, 4))
def test_groups_never_cross_splits(seed, sizes, classes):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.array([f"p{i}" for i in range(len(sizes))]), sizes)
    group_class = rng.integers(0, classes, len(sizes))
    labels = np.repeat(group_class, sizes)
    # every class needs ≥ 2 groups; otherwise the split must refuse
    per_class_groups = [np.unique(groups[labels == c]) for c in np.unique(labels)]
    if any(len(g) < 2 for g in per_class_groups) or len(sizes) < 10:
        with pytest.raises(DataError):
            sp.grouped_split(labels, groups, 0.1, 0.2, seed)
        return
    parts, _notes = sp.grouped_split(labels, groups, 0.1, 0.2, seed)
    allidx = np.concatenate(list(parts.values()))
    assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    seen = [set(groups[v]) for v in parts.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_group_holding_a_whole_class_is_refused():
    labels = np.array([0] * 10 + [1] * 6)
    groups = np.array([f"a{i}" for i in range(10)] + ["b"] * 6)
    with pytest.raises(DataError, match="class '1'.*group 'b'"):
        sp.grouped_split(labels, groups, 0.1, 0.2, 0)


def test_oversized_group_is_reported():
    """One patient holds 80 % of the images: wherever it goes, some split misses its fraction, and
    the note names the group."""
    labels = np.array([0, 1] * 30)
    groups = np.array(["big"] * 48 + [f"g{i}" for i in range(12)])
    for seed in range(3):
        parts, notes = sp.grouped_split(labels, groups, 0.1, 0.2, seed)
        assert not set(groups[parts["train"]]) & set(groups[parts["test"]])
        assert notes and "'big'" in notes[0]


@pytest.mark.parametrize("grouped", [False, True])
def test_folds_partition_the_pool_and_leave_test_alone(grouped):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    groups = np.array([f"p{i // 4}" for i in range(200)]) if grouped else None
    pool = np.arange(160)
    vals = []
    for f in range(5):
        tr, va = sp.fold_split(labels, pool, 5, f, seed=0, groups=groups)
        assert len(np.intersect1d(tr, va)) == 0 and set(tr) | set(va) == set(pool)
        if grouped:
            assert not set(groups[tr]) & set(groups[va])
        vals.append(va)
    allv = np.concatenate(vals)
    assert sorted(allv.tolist()) == pool.tolist()
    with pytest.raises(DataError, match="fold 5 does not exist"):
        sp.fold_split(labels, pool, 5, 5, 0)


def test_fold_beyond_k_is_a_config_error():
    with pytest.raises(ConfigError, match="data.fold=3 needs data.folds > 3"):
        load_config(None, [("data.folds", 3), ("data.fold", 3)])


def _manifest(tmp_path: Path, n_patients: int = 24, per: int = 3, empty_group_row: int | None = None) -> Path:
    rows = []
    for p in range(n_patients):
        label = p % 2
        for k in range(per):
            f = tmp_path / f"p{p}_{k}.png"
            Image.fromarray(np.full((8, 8), 40 + 150 * label, dtype=np.uint8)).save(f)
            rows.append({"path": f.name, "label": ["benign", "malignant"][label], "group": f"pat{p}"})
    if empty_group_row is not None:
        rows[empty_group_row]["group"] = ""
    m = tmp_path / "manifest.csv"
    with open(m, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return m


def test_csv_group_column_and_group_pattern(tmp_path):
    m = _manifest(tmp_path)
    b = build_data(load_config(None, [("data.name", str(m))]).data)
    g = b.source.groups
    assert not set(g[b.splits["train"]]) & set(g[b.splits["test"]])
    assert "grouped" in b.split_record()["origin"]
    b2 = build_data(load_config(None, [("data.name", str(m)), ("data.group_pattern", r"^(p\d+)_")]).data)
    assert set(b2.source.groups) == {f"p{i}" for i in range(24)}
    with pytest.raises(DataError, match="does not match the file name"):
        build_data(load_config(None, [("data.name", str(m)), ("data.group_pattern", r"^x(\d+)")]).data)
    b3 = build_data(load_config(None, [("data.name", str(m)), ("data.folds", 4), ("data.fold", 2)]).data)
    assert np.array_equal(b3.splits["test"], b.splits["test"])
    assert "fold 2 of 4" in b3.split_origin


def test_empty_group_cell_is_refused(tmp_path):
    m = _manifest(tmp_path, empty_group_row=5)
    with pytest.raises(DataError, match=r"manifest.csv:7: empty group cell"):
        build_data(load_config(None, [("data.name", str(m))]).data)


# --- end to end: thresholds, external validation ---------------------------------------------------------

@pytest.fixture
def binary_run(tmp_path):
    from conftest import TINY_CNN, write_npz

    from medistill.distill.engine import Engine

    npz = write_npz(tmp_path / "bin.npz", counts=(30, 12))
    cfg = load_config(None, [], base={"data": {"name": str(npz), "augment": "none"}, "out": str(tmp_path / "run"),
                                       "students": [{"name": "s", "model": "cnn5", "kwargs": TINY_CNN}],
                                       "train": {"epochs": 2, "batch_size": 16, "latency": False, "progress": False},
                                       "eval": {"bootstrap": 200}})
    Engine(cfg).run()
    return tmp_path / "run", npz


def test_binary_run_reports_intervals_and_saves_its_threshold(binary_run, tmp_path):
    run, npz = binary_run
    m = json.loads((run / "students" / "s" / "metrics.json").read_text())
    assert m["test"]["ci95"]["resamples"] == 200 and len(m["test"]["ci95"]["balanced_accuracy"]) == 2
    assert set(m["test"]["operating_points"]) == {"argmax", "threshold"}
    assert m["threshold"]["rule"].startswith("Youden")
    spec = json.loads((run / "students" / "s" / "model.json").read_text())
    assert spec["threshold"] == m["threshold"]["value"]
    assert "(" in (run / "summary.md").read_text() and "bootstrap" in (run / "summary.md").read_text()
    # predict applies the saved threshold, also from the ONNX export's metadata
    from medistill.commands.deploy import export_model, predict_files

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(img)
    r = predict_files(run, [img])[0]
    assert r["threshold"] == spec["threshold"] and r["class"] == int(r["probabilities"][1] >= spec["threshold"])
    onnx_path = export_model(run)["path"]
    assert predict_files(onnx_path, [img])[0]["threshold"] == spec["threshold"]
    from medistill.report import build_report

    page = Path(build_report([run])).read_text()
    assert "Operating points" in page and f"P(class 1) ≥ {spec['threshold']:.3f}" in page and "bootstrap" in page


def test_external_validation_scores_every_image_once(binary_run, tmp_path):
    from conftest import write_npz

    from medistill.commands.evaluate import evaluate_target

    run, _ = binary_run
    before = (run / "students" / "s" / "metrics.json").read_bytes()
    other = write_npz(tmp_path / "hospital_b.npz", counts=(9, 7), seed=5)
    res = evaluate_target(run, data=str(other), split="all", latency=False)["s"]
    n_images = sum(len(np.load(other)[f"{s}_labels"]) for s in ("train", "val", "test"))
    assert res["all"]["n"] == n_images and res["data"]["images"] == n_images
    dest = next((run / "students" / "s" / "external").glob("hospital_b-*"))     # named by content too
    rows = (dest / "predictions_all.csv").read_text().splitlines()[1:]
    assert sorted(int(r.split(",")[0]) for r in rows) == list(range(n_images))
    assert (run / "students" / "s" / "metrics.json").read_bytes() == before
    # classes are matched by name: an unknown class is named, a mapping fixes it
    three = write_npz(tmp_path / "three.npz", counts=(5, 5, 5))
    with pytest.raises(DataError, match=r"classes \['2'\] that the model does not know"):
        evaluate_target(run, data=str(three), split="all", latency=False)
    res = evaluate_target(run, data=str(three), split="all", latency=False, class_map=["2=1"])["s"]
    assert res["all"]["n"] == sum(len(np.load(three)[f"{s}_labels"]) for s in ("train", "val", "test"))
    with pytest.raises(ConfigError, match="--split all"):
        evaluate_target(run, split="all")


def test_cross_validation_sweep_pools_folds(tmp_path):
    import yaml
    from conftest import tiny_cfg, write_npz

    from medistill.commands.sweep import run_sweep

    npz = write_npz(tmp_path / "d.npz")
    cfg = tiny_cfg(npz, tmp_path / "unused", epochs=1)
    cfg["data"]["folds"] = 3
    cfg["eval"] = {"bootstrap": 0}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rows = run_sweep(path, tmp_path / "cv", grid=["data.fold=0,1,2"])
    assert [r["data.fold"] for r in rows] == ["0", "1", "2"]
    tests = {json.dumps(json.loads((tmp_path / "cv" / r["run"] / "split.json").read_text())["test"]) for r in rows}
    vals = [set(json.loads((tmp_path / "cv" / r["run"] / "split.json").read_text())["val"]) for r in rows]
    assert len(tests) == 1 and not (vals[0] & vals[1] or vals[0] & vals[2] or vals[1] & vals[2])
    md = (tmp_path / "cv" / "results.md").read_text()
    assert "n runs" in md and "mean ± std over folds × seeds" in md
    assert len([ln for ln in md.splitlines() if ln.startswith("| ce")]) == 1
