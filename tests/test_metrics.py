"""Every metric against scikit-learn on fixed and random vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from medistill.eval.metrics import classification_metrics, selection_score


def _probs(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, c) * torch.rand(n, 1, generator=g)
    return torch.softmax(logits, -1), labels


def _ece_reference(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    e = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            e += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return e


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn(seed: int) -> None:
    p, y = _probs(300, 5, seed)
    m = classification_metrics(p, y)
    pn, yn = p.double().numpy(), y.numpy()
    pred = pn.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(yn, pred), abs=1e-9)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(yn, pred), abs=1e-9)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(yn, pred, average="macro"), abs=1e-6)
    assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(yn, pred, weights="quadratic"), abs=1e-6)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(yn, pn, multi_class="ovr", average="macro"), abs=1e-5)
    assert m["nll"] == pytest.approx(skm.log_loss(yn, pn, labels=range(5)), abs=1e-6)
    assert m["ece"] == pytest.approx(_ece_reference(pn, yn), abs=1e-5)
    assert m["confusion_matrix"] == skm.confusion_matrix(yn, pred, labels=range(5)).tolist()
    assert m["per_class_recall"] == pytest.approx(skm.recall_score(yn, pred, average=None).tolist(), abs=1e-9)


def test_fixed_vector() -> None:
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    m = classification_metrics(torch.nn.functional.one_hot(pred, 3).double() * 0.9 + 0.1 / 3, y)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_absent_class_is_ignored_not_zero() -> None:
    """UMKD mAcc: nanmean over classes present in the evaluation set."""
    y = torch.tensor([0, 0, 1, 1])
    p = torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])
    m = classification_metrics(p, y)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["per_class_recall"][2] is None
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y.numpy(), p.argmax(1).numpy()))


def test_selection_score() -> None:
    assert selection_score({"nll": 0.5}, "neg_nll") == -0.5
    assert selection_score({"auroc": None}, "auroc") == float("-inf")


def test_qwk_only_for_ordinal_data(tmp_path) -> None:
    """QWK weighs confusions by class-id distance: reported for graded data, None for nominal."""
    import torch

    from conftest import write_npz
    from medistill.config import load_config
    from medistill.data import build_data
    from medistill.eval.tables import summary_table
    from medistill.eval.metrics import classification_metrics

    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    y = torch.tensor([0, 1, 2, 2])
    assert classification_metrics(p, y)["qwk"] is not None
    nominal = classification_metrics(p, y, ordinal=False)
    assert nominal["qwk"] is None and nominal["balanced_accuracy"] == classification_metrics(p, y)["balanced_accuracy"]
    assert build_data(load_config(None, ["data.name=retinamnist"]).data).ordinal is True
    npz = write_npz(tmp_path / "d.npz")
    assert build_data(load_config(None, [f"data.name={npz}"]).data).ordinal is False
    assert build_data(load_config(None, [f"data.name={npz}", "data.ordinal=true"]).data).ordinal is True
    row = {"role": "student", "model": {"params": 1, "flops": 1}, "test": nominal}
    assert "QWK" not in summary_table({"s": row})
    assert "QWK" in summary_table({"s": {**row, "test": {**nominal, "qwk": 0.5}}})
