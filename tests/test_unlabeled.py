"""Unlabelled images (data.unlabeled, data.label_fraction, data.unlabeled_ratio): label terms see
only labelled rows, the teacher cache covers the pool, the label share is exact, bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CNN, make_images, run_cli, tiny_cfg
from medistill.config import DataConfig, load_config
from medistill.data.dataset import build_data
from medistill.data.mixed import MixedBatchSampler
from medistill.distill.context import StepContext
from medistill.distill.engine import Engine
from medistill.distill.objective import objective
from medistill.distill.terms import TermSetup, make_term
from medistill.errors import DataError


def _unlabeled_npz(path: Path, n: int = 24, seed: int = 9) -> Path:
    x, _ = make_images([n // 3] * 3, 16, 3, seed)
    np.savez(path, images=x)
    return path


def _engine(data_dir: Path, teacher: Path, out: Path, terms: list[dict], **data: object) -> Engine:
    cfg = tiny_cfg(data_dir / "tiny.npz", out, epochs=1)
    cfg["data"].update(data)
    cfg["train"]["teacher_amp"] = "off"   # cached rows are compared with the teacher run here in fp32
    cfg["teachers"] = [{"name": "t0", "checkpoint": str(teacher)}]
    cfg["students"] = [{"name": "s0", "model": "cnn5", "kwargs": TINY_CNN}]
    cfg["terms"] = terms
    eng = Engine(load_config(None, [], base=cfg))
    eng.setup()
    return eng


def test_label_terms_see_only_labelled_rows(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    unl = _unlabeled_npz(tmp_path / "unl.npz")
    eng = _engine(data_dir, teachers[0], tmp_path / "run", [{"type": "ce", "weight": 0.3},
                                                              {"type": "kd", "weight": 0.7, "temperature": 2.0}],
                  unlabeled=str(unl))
    assert eng.use_unlabeled and len(eng.data.splits["unlabeled"]) == 24
    x, y, idx, view = next(iter(eng._train_loader(0)))
    y = torch.as_tensor(y)
    assert (y < 0).any() and (y >= 0).any()
    assert bool(((torch.as_tensor(idx) >= len(eng.data.source)) == (y < 0)).all())   # −1 exactly on the pool's ids
    t_logits, t_feats = eng._teacher_outputs(x, torch.as_tensor(idx), torch.as_tensor(view))
    s_logits, s_feats = eng._student_outputs(x, {"s0"})
    ctx = StepContext(logits={**t_logits, **s_logits}, feats={**t_feats, **s_feats}, target=y, epoch=0.5,
                      class_counts=eng.class_counts, class_prior=eng.class_prior, teachers=["t0"], students=["s0"],
                      labelled=y >= 0)
    total, logs = objective(eng.terms, eng.term_specs, ctx, "s0", eng.device, "off", tmp_path / "ck")
    # naive: CE averaged over the labelled images only, KD (τ² KL, batchmean) over every image
    zs, zt = s_logits["s0"].detach().double(), t_logits["t0"].double()
    ce = [-torch.log_softmax(zs[i], 0)[y[i]] for i in range(len(y)) if y[i] >= 0]
    ce_ref = sum(ce) / len(ce)
    kd = 0.0
    for i in range(len(y)):
        p = torch.softmax(zt[i] / 2, 0)
        kd += float((p * (p.log() - torch.log_softmax(zs[i] / 2, 0))).sum()) * 4
    kd_ref = kd / len(y)
    assert float(logs["ce"]) == pytest.approx(float(ce_ref), rel=1e-5)
    assert float(logs["kd"]) == pytest.approx(kd_ref, rel=1e-4)
    assert float(total.detach()) == pytest.approx(0.3 * float(ce_ref) + 0.7 * kd_ref, rel=1e-4)
    # a batch of unlabelled images only: the label term is zero, KD still trains
    only = ctx.only(y < 0)
    only.labelled = torch.zeros(len(only.target), dtype=torch.bool)
    total, logs = objective(eng.terms, eng.term_specs, only, "s0", eng.device, "off", tmp_path / "ck")
    assert float(logs["ce"]) == 0.0 and float(logs["kd"]) > 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in eng.students[0].model.parameters())


def test_cached_targets_of_unlabelled_images_equal_live_teacher(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    unl = _unlabeled_npz(tmp_path / "unl.npz")
    eng = _engine(data_dir, teachers[0], tmp_path / "run", [{"type": "kd", "weight": 1.0}], unlabeled=str(unl),
                  augment="dihedral")
    assert "t0" in eng.cache
    n = len(eng.data.source)
    seen = 0
    for x, _y, idx, view in eng._train_loader(0):
        idx, view = torch.as_tensor(idx), torch.as_tensor(view)
        pool = idx >= n
        if not pool.any():
            continue
        live = eng.teachers[0].logits(x[pool])
        cached = eng.cache["t0"].lookup(idx[pool], view[pool])["logits"]
        assert torch.allclose(cached, live, atol=1e-5)
        seen += int(pool.sum())
    assert seen == 24   # every unlabelled image once per epoch (no ratio set)


def test_label_fraction_keeps_the_stratified_share(data_dir: Path) -> None:
    full = build_data(DataConfig(name=str(data_dir / "tiny.npz")))
    part = build_data(DataConfig(name=str(data_dir / "tiny.npz"), label_fraction=0.25))
    y = full.source.labels
    for c in range(full.num_classes):
        n_c = int((y[full.splits["train"]] == c).sum())
        assert int((y[part.splits["train"]] == c).sum()) == max(1, round(n_c * 0.25))
    assert np.array_equal(part.splits["val"], full.splits["val"]) and np.array_equal(part.splits["test"], full.splits["test"])
    both = np.concatenate([part.splits["train"], part.splits["unlabeled"]])
    assert np.array_equal(np.sort(both), np.sort(full.splits["train"])) and len(np.unique(both)) == len(both)
    # the moved images come out of the training loader without their label
    ds = part.dataset("train", train=False, unlabeled=True)
    labels = np.array([ds[k][1] for k in range(len(ds))])
    assert (labels[len(part.splits["train"]):] == -1).all() and (labels[:len(part.splits["train"])] >= 0).all()


def test_mixed_batches_hold_the_stated_share() -> None:
    bs = MixedBatchSampler(n_labelled=50, n_unlabeled=30, batch_size=10, ratio=0.4, seed=3)
    batches = list(bs)
    assert len(batches) == len(bs) == 9          # ceil(50 / 6)
    lab = [i for b in batches for i in b if i < 50]
    assert sorted(lab) == list(range(50))        # every labelled image once
    assert all(sum(i >= 50 for i in b) == 4 for b in batches)
    assert bs.unlabeled_per_epoch() == 36 and all(50 <= i < 80 for b in batches for i in b if i >= 50)
    assert [list(b) for b in MixedBatchSampler(50, 30, 10, 0.4, 3)] == batches   # seeded


def test_kd_threshold_drops_unconfident_unlabelled_images_only() -> None:
    setup = TermSetup(students=["s"], teachers=["t"], num_classes=3, class_counts=torch.ones(3), tap_shapes={}, models={})
    term = make_term("kd", "s", {"temperature": 1.0, "unlabeled_threshold": 0.6}, setup)
    zt = torch.tensor([[3.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.2, 0.1, 0.0], [0.0, 4.0, 0.0]])
    zs = torch.tensor([[0.5, 0.1, 0.2], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.3]])
    labelled = torch.tensor([True, True, False, False])   # row 2: unlabelled, teacher unsure → dropped
    ctx = StepContext(logits={"t": zt, "s": zs}, feats={}, target=torch.tensor([0, 1, -1, -1]), epoch=0.0,
                      class_counts=torch.ones(3), class_prior=torch.ones(3) / 3, teachers=["t"], students=["s"],
                      labelled=labelled)
    loss, diag = term(ctx)
    per = [float(F.kl_div(torch.log_softmax(zs[i], 0), torch.softmax(zt[i], 0), reduction="sum")) for i in range(4)]
    assert float(loss) == pytest.approx((per[0] + per[1] + per[3]) / 4, rel=1e-5)   # kept rows, divided by B
    assert float(diag["unlabeled_kept"]) == pytest.approx(0.5)


def test_the_run_records_the_unlabelled_share(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    unl = _unlabeled_npz(tmp_path / "unl.npz")
    eng = _engine(data_dir, teachers[0], tmp_path / "run", [{"type": "ce", "weight": 0.1}, {"type": "kd", "weight": 0.9}],
                  unlabeled=str(unl), unlabeled_ratio=0.25)
    eng.fit()
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    bs = MixedBatchSampler(len(eng.data.splits["train"]), 24, 16, 0.25, 0)
    assert line["unlabeled"] == {"seen": bs.unlabeled_per_epoch(), "pool": 24,
                                 "share": round(bs.unlabeled_per_epoch() / 24, 4)}
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["unlabeled"]) == 24 and split["unlabeled_source"]["images"] == 24


def test_unused_pool_is_said_and_training_is_labelled_only(data_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data_dir / "tiny.npz", tmp_path / "run", epochs=1)
    cfg["data"]["label_fraction"] = 0.5
    eng = Engine(load_config(None, [], base=cfg))
    eng.setup()
    assert not eng.use_unlabeled
    assert len(eng._train_loader(0).dataset) == len(eng.data.splits["train"])


def _folder_with_classes(root: Path) -> Path:
    from PIL import Image

    for c in ("benign", "malignant"):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / c / "a.png")
    return root


def test_bad_unlabelled_input_is_named(data_dir: Path, tmp_path: Path) -> None:
    npz = str(data_dir / "tiny.npz")
    with pytest.raises(DataError, match="class-like sub-folders with images \\(benign, malignant\\)"):
        build_data(DataConfig(name=npz, unlabeled=str(_folder_with_classes(tmp_path / "tree"))))
    (tmp_path / "m.csv").write_text("path,label\na.png,0\n")
    with pytest.raises(DataError, match="has a label column: labelled images go in --data"):
        build_data(DataConfig(name=npz, unlabeled=str(tmp_path / "m.csv")))
    x, y = make_images([3, 3], 16)
    np.savez(tmp_path / "l.npz", images=x, labels=y)
    with pytest.raises(DataError, match="holds labels \\(labels\\)"):
        build_data(DataConfig(name=npz, unlabeled=str(tmp_path / "l.npz")))
    with np.load(npz) as z:   # a test image among the unlabelled ones
        leak = np.concatenate([z["train_images"][:3], z["test_images"][:1]])
    np.savez(tmp_path / "leak.npz", images=leak)
    with pytest.raises(DataError, match="1 unlabelled image\\(s\\) are copies of test images"):
        build_data(DataConfig(name=npz, unlabeled=str(tmp_path / "leak.npz")))
    with pytest.raises(DataError, match="unlabelled images not found: .*nope"):
        build_data(DataConfig(name=npz, unlabeled=str(tmp_path / "nope")))


def test_cli_flags_and_exit_code(data_dir: Path, teachers: list[Path], tmp_path: Path) -> None:
    tree = _folder_with_classes(tmp_path / "tree")
    r = run_cli("distill", "--teacher", str(teachers[0]), "--method", "kd", "--model", "cnn5", "--epochs", "1",
                "--out", str(tmp_path / "o"), "--unlabeled", str(tree))
    assert r.returncode == 2
    assert "class-like sub-folders" in r.stderr + r.stdout
    assert not (tmp_path / "o").exists()
    r = run_cli("train", "--data", str(data_dir / "tiny.npz"), "--model", "cnn5", "--out", str(tmp_path / "p"),
                "--label-fraction", "1.5", "--print-config")
    assert r.returncode == 2 and "label_fraction" in r.stderr + r.stdout


def _pool_folder(folder: Path, images: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    return folder


def test_pool_copies_are_found_by_decoded_pixels_per_duplicates_mode(data_dir: Path, tmp_path: Path) -> None:
    npz = str(data_dir / "tiny.npz")
    fresh, _ = make_images([4, 4], 16, 3, seed=31)
    with np.load(npz) as z:
        train, test = z["train_images"][:2], z["test_images"][:1]
    # PNG files beside an .npz: no byte hash could match them, decoded pixels do
    mixed = _pool_folder(tmp_path / "pool", np.concatenate([fresh, train]))
    b = build_data(DataConfig(name=npz, unlabeled=str(mixed)))
    assert len(b.splits["unlabeled"]) == 10
    assert any("2 unlabelled image(s) are copies of train images" in n for n in b.split_notes)
    with pytest.raises(DataError, match="2 unlabelled image\\(s\\) are copies of train images .*data.duplicates=warn"):
        build_data(DataConfig(name=npz, unlabeled=str(mixed), duplicates="error"))
    dropped = build_data(DataConfig(name=npz, unlabeled=str(mixed), duplicates="drop"))
    assert dropped.pool_kept().tolist() == list(range(8))
    assert dropped.split_record()["unlabeled_source"]["kept"] == list(range(8))
    assert len(build_data(DataConfig(name=npz, unlabeled=str(mixed), duplicates="off")).splits["unlabeled"]) == 10
    # a test image: refused under warn and error, left out under drop
    leak = _pool_folder(tmp_path / "leak", np.concatenate([fresh, test]))
    with pytest.raises(DataError, match="1 unlabelled image\\(s\\) are copies of test images .*leak/08.png"):
        build_data(DataConfig(name=npz, unlabeled=str(leak)))
    assert build_data(DataConfig(name=npz, unlabeled=str(leak), duplicates="drop")).pool_kept().tolist() == list(range(8))


def test_resume_refuses_a_changed_pool_and_scoring_never_opens_it(data_dir: Path, teachers: list[Path],
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    fresh, _ = make_images([4, 4, 4], 16, 3, seed=41)
    pool = _pool_folder(tmp_path / "pool", fresh)
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teachers[0]), "--method", "kd", "--model", "cnn5", "--epochs", "1",
            "--out", str(out), "--unlabeled", str(pool)]
    assert run_cli(*args).returncode == 0
    split = json.loads((out / "split.json").read_text())["unlabeled_source"]
    assert split["images"] == 12 and split["files"][:2] == ["00.png", "01.png"]
    saved = {p.name: p.read_bytes() for p in pool.iterdir()}

    def said(*more: str) -> tuple[int, str]:
        r = run_cli("distill", "--out", str(out), "--resume", "--epochs", "2", *more)
        return r.returncode, " ".join((r.stdout + r.stderr).split())

    # replaced files (same names), then a file added that sorts first and one removed
    _pool_folder(pool, 255 - fresh[:3])
    code, text = said()
    assert code == 2 and "the unlabelled images at" in text and "changed since the run's split was saved" in text
    assert "the same names, but files replaced or edited" in text
    for name, data in saved.items():
        (pool / name).write_bytes(data)
    (pool / "00.png").unlink()
    _pool_folder(tmp_path / "extra", fresh[:1])
    shutil.copy(tmp_path / "extra" / "00.png", pool / "!first.png")
    code, text = said()
    assert code == 2 and "1 added (e.g. !first.png); 1 removed (e.g. 00.png)" in text
    assert json.loads((out / "split.json").read_text())["unlabeled_source"] == split   # nothing rewritten
    # evaluate and explain never read the pool: moved away, from another working directory
    shutil.move(str(pool), str(tmp_path / "moved"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = run_cli("evaluate", str(out))
    assert r.returncode == 0, r.stdout[-800:] + r.stderr[-800:]
    r = run_cli("explain", str(out), "--images", "1", "--methods", "gradcam")
    assert r.returncode == 0, r.stdout[-800:] + r.stderr[-800:]
