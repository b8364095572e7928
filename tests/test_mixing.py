"""Mixing augmentation and the function-matching preset: the mixing against its formula, the
mixed-label CE against a naive loop, and the same mixed pixels reaching teacher and student."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_engine, tiny_cfg
from medistill.data.transforms import mix_batch
from medistill.errors import ConfigError


def test_mixup_is_the_convex_combination() -> None:
    x = torch.rand(5, 3, 8, 8)
    out, perm, lam = mix_batch(x, "mixup", 1.0, np.random.default_rng(0))
    ref_rng = np.random.default_rng(0)
    lam_ref = ref_rng.beta(1.0, 1.0)
    perm_ref = ref_rng.permutation(5)
    assert lam == pytest.approx(lam_ref) and perm.tolist() == perm_ref.tolist()
    for i in range(5):
        assert torch.allclose(out[i], lam_ref * x[i] + (1 - lam_ref) * x[perm_ref[i]])


def test_cutmix_pastes_one_box_and_lam_is_the_share_kept() -> None:
    x = torch.arange(2 * 1 * 10 * 10, dtype=torch.float32).view(2, 1, 10, 10)
    for seed in range(20):
        out, perm, lam = mix_batch(x, "cutmix", 1.0, np.random.default_rng(seed))
        changed = (out != x).any(1)                                    # [B, H, W]
        from_other = (out == x[perm]).all(1)
        for i in range(2):
            if perm[i] == i:
                continue
            # every changed pixel comes from the other image, and they form the box whose area is 1 − lam
            assert bool(from_other[i][changed[i]].all())
            assert changed[i].float().mean().item() == pytest.approx(1 - lam)
            rows, cols = changed[i].any(1).nonzero(), changed[i].any(0).nonzero()
            if len(rows):
                assert changed[i].sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_ce_with_mixed_labels_against_a_naive_loop() -> None:
    from medistill.distill.context import StepContext
    from medistill.distill.terms import TermSetup, make_term

    torch.manual_seed(0)
    z = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    y2 = torch.tensor([2, 2, 1, 1, 0, 0])
    lam = 0.3
    setup = TermSetup(students=["s"], teachers=[], num_classes=3, class_counts=torch.ones(3), tap_shapes={},
                      models={})
    term = make_term("ce", "s", {}, setup)
    ctx = StepContext(logits={"s": z}, feats={}, target=y, epoch=0.0, class_counts=torch.ones(3),
                      class_prior=torch.ones(3) / 3, teachers=[], students=["s"], mix=(y2, lam))
    naive = 0.0
    for i in range(6):
        p = [math.exp(v) for v in z[i].tolist()]
        naive += -(lam * math.log(p[y[i]] / sum(p)) + (1 - lam) * math.log(p[y2[i]] / sum(p))) / 6
    assert float(term(ctx)) == pytest.approx(naive, rel=1e-5)


def test_fm_feeds_teacher_and_student_the_same_mixed_pixels(teachers: list[Path], data_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from medistill.assemble import assemble_run
    from medistill.distill import engine as engine_mod
    from medistill.distill.engine import Engine
    from medistill.distill.participants import Participant

    seen: dict[str, list[torch.Tensor]] = {"raw": [], "mixed": [], "teacher": [], "student": []}
    original_mix = engine_mod.mix_batch

    def recording_mix(x, kind, alpha, rng):
        out = original_mix(x, kind, alpha, rng)
        seen["raw"].append(x.clone())
        seen["mixed"].append(out[0].clone())
        return out

    original_logits = Participant.logits

    def recording_logits(self, x, channels_last=False):
        if not self.trainable:
            seen["teacher"].append(x.clone())
        return original_logits(self, x, channels_last)

    monkeypatch.setattr(engine_mod, "mix_batch", recording_mix)
    monkeypatch.setattr(Participant, "logits", recording_logits)
    base = tiny_cfg(data_dir / "tiny.npz", tmp_path / "fm", epochs=1)
    cfg = assemble_run("distill", base, [], teachers=[str(teachers[0])], method="fm")
    assert cfg.train.mix == "mixup" and [t.type for t in cfg.terms] == ["kd"]
    original_students = Engine._student_outputs

    def recording_students(self, x, grad_for):
        seen["student"].append(x.clone())
        return original_students(self, x, grad_for)

    monkeypatch.setattr(Engine, "_student_outputs", recording_students)
    eng = Engine(cfg)
    eng.run()
    assert not eng.cache                                    # mixed images cannot come from a cache
    n = len(seen["mixed"])
    assert n >= 1 and len(seen["teacher"]) >= n
    for k in range(n):   # training steps come first: the same mixed batch reaches teacher and student
        assert torch.equal(seen["teacher"][k], seen["mixed"][k]) and torch.equal(seen["student"][k], seen["mixed"][k])
        assert not torch.equal(seen["mixed"][k], seen["raw"][k])


def test_mixing_refuses_terms_that_need_one_label(teachers: list[Path], data_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data_dir / "tiny.npz", tmp_path / "x", epochs=1, mix="mixup")
    cfg["teachers"] = [{"name": "teacher", "checkpoint": str(teachers[0])}]
    cfg["terms"] = [{"type": "ce"}, {"type": "dkd"}]
    with pytest.raises(ConfigError, match="dkd"):
        run_engine(cfg)
    cfg["terms"] = [{"type": "ce"}, {"type": "kd", "gate_correct": True}]
    with pytest.raises(ConfigError, match="gate_correct"):
        run_engine(cfg)
