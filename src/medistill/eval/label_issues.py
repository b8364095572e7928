"""Likely label errors: a model's out-of-sample class probabilities handed to cleanlab.

Out of sample means the model never trained on the image: a run's validation and test images,
and — when asked (``oof=K``) — the training images through K-fold out-of-fold predictions of a
logistic-regression probe on the run's penultimate features. The probe's features come from a
model that saw these images with their labels, so it finds fewer errors than K retrained models
would; it costs one pass over the images instead of K trainings (said in the audit's output).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medistill.errors import DataError
from medistill.io import atomic_write


@torch.no_grad()
def model_outputs(models: list[Any], dataset: Any, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Mean softmax ``[N, K]`` of ``models`` (saved students: images in [0, 1] → logits) and the
    first model's penultimate features ``[N, D]`` over ``dataset`` (unaugmented)."""
    probs, feats = [], []
    for x, _y, _i, _v in DataLoader(dataset, batch_size=batch_size):
        m0 = models[0].model
        fmap = m0.forward_features(models[0].pre(x))     # one backbone pass gives both head outputs
        logits = [m0.forward_head(fmap)] + [m(x) for m in models[1:]]
        p = torch.stack([torch.softmax(z.float(), -1) for z in logits]).mean(0)
        probs.append(p.numpy())
        feats.append(m0.forward_head(fmap, pre_logits=True).flatten(1).float().numpy())
    return np.concatenate(probs), np.concatenate(feats)


def check_folds(labels: np.ndarray, folds: int, num_classes: int) -> None:
    """Refuse a K that stratified folds over ``labels`` cannot have (before any model runs)."""
    counts = np.bincount(labels, minlength=num_classes)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        raise DataError(f"out-of-fold predictions need ≥ 2 training images per class; the smallest class has {smallest}")
    if folds > smallest:   # StratifiedKFold needs every class in every fold: no silent cap on K
        raise DataError(f"--oof {folds}: each of the K folds needs an image of every class, and the smallest training "
                        f"class has {smallest}; use --oof {min(smallest, 10)} or fewer")


def out_of_fold_probs(features: np.ndarray, labels: np.ndarray, folds: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """K-fold out-of-fold probabilities ``[N, K_classes]`` of a logistic regression (scikit-learn)
    on the standardised features' 64 principal components; classes with fewer images than folds
    still get a column."""
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    check_folds(labels, folds, num_classes)
    k = int(folds)
    out = np.zeros((len(labels), num_classes))
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(features, labels):
        # 64 principal components: the probe's cost stays seconds for wide features (2,048 for a
        # ResNet-50) while keeping what separates the classes; max_iter bounds lbfgs on hard folds
        dims = min(64, features.shape[1], len(tr) - 1)
        clf = make_pipeline(StandardScaler(), PCA(dims, random_state=seed), LogisticRegression(max_iter=500))
        with warnings.catch_warnings():   # an unconverged probe still ranks; its warning is noise to a user
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(features[tr], labels[tr])
        out[np.ix_(te, clf.classes_)] = clf.predict_proba(features[te])
    return out


def rank_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Positions of likely label errors, most likely first (cleanlab's confident learning,
    ranked by the self-confidence p(given label))."""
    from cleanlab.filter import find_label_issues

    probs = np.clip(probs, 1e-12, None)
    probs = probs / probs.sum(1, keepdims=True)
    return np.asarray(find_label_issues(labels, probs, return_indices_ranked_by="self_confidence"), dtype=np.int64)


def issue_rows(source: Any, split: str, idx: np.ndarray, labels: np.ndarray, probs: np.ndarray, ranked: np.ndarray,
               names: list[str], thumbs: Path | None) -> list[dict[str, Any]]:
    """One row per flagged image: where it is, the given and the suggested label, both
    probabilities; an in-memory image is written as a PNG under ``thumbs`` so a person can look."""
    from PIL import Image

    rows = []
    for pos in ranked:
        i = int(idx[pos])
        given, sugg = int(labels[pos]), int(probs[pos].argmax())
        image = source.path(i)
        if source.in_memory and thumbs is not None:
            thumbs.mkdir(parents=True, exist_ok=True)
            arr = source.load(i)
            image = str(thumbs / f"{split}_{i}.png")
            pic = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
            atomic_write(image, lambda p, pic=pic: pic.save(p, format="PNG"))
        rows.append({"split": split, "index": i, "image": image, "given": names[given], "suggested": names[sugg],
                     "p_given": round(float(probs[pos, given]), 4), "p_suggested": round(float(probs[pos, sugg]), 4)})
    return rows
