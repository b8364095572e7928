"""Seeded, stratified train/val/test splits and the imbalance tools of the papers.

Everything here works on index arrays into an :class:`~medistill.data.sources.ImageSource`;
val and test are never resampled, so every model of a study is tested on the same untouched
test split.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from medistill.errors import DataError

if TYPE_CHECKING:
    from medistill.config import DataConfig
    from medistill.data.sources import ImageSource


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C]`` int64 counts."""
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int,
                     tiny_class_policy: str = "error", class_names: list[str] | None = None,
                     base: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Split ``base`` indices (default: all) per class by ``fractions`` (which must include
    ``train``; other parts get ``round(n·f)`` samples, at least 1).

    A class with fewer samples than parts cannot reach every part: under ``"error"`` that is a
    :class:`DataError` saying so; under ``"train_only"`` its samples all go to train, with a
    warning (the class then has no val/test estimate).
    """
    rng = np.random.default_rng(seed)
    idx_all = np.arange(len(labels)) if base is None else np.asarray(base)
    others = [k for k in fractions if k != "train" and fractions[k] > 0]
    out: dict[str, list[int]] = {k: [] for k in ["train", *others]}
    for c in np.unique(labels[idx_all]):
        idx = idx_all[labels[idx_all] == c]
        idx = idx[rng.permutation(len(idx))]
        name = class_names[c] if class_names else str(c)
        if len(idx) < len(others) + 1:
            if tiny_class_policy == "train_only":
                warnings.warn(f"class {name!r} has {len(idx)} image(s), fewer than the {len(others) + 1} "
                              "split parts; all go to train (no val/test estimate for it)", stacklevel=2)
                out["train"].extend(idx.tolist())
                continue
            raise DataError(
                f"class {name!r} has only {len(idx)} image(s); a stratified {'/'.join(out)} split needs at "
                f"least {len(others) + 1}. Add images, merge or drop the class, or set "
                "data.tiny_class_policy=train_only"
            )
        start = 0
        for k in others:
            n = max(1, int(round(len(idx) * fractions[k])))
            n = min(n, len(idx) - start - 1 - (len(others) - others.index(k) - 1))
            out[k].extend(idx[start:start + n].tolist())
            start += n
        out["train"].extend(idx[start:].tolist())
    return {k: np.sort(np.array(v, dtype=np.int64)) for k, v in out.items()}


def make_splits(labels: np.ndarray, split_tags: np.ndarray | None, val_fraction: float,
                test_fraction: float, seed: int, tiny_class_policy: str = "error",
                class_names: list[str] | None = None) -> tuple[dict[str, np.ndarray], str]:
    """The dataset's own split when present (val carved from train if missing), otherwise a
    seeded stratified split. Returns the index arrays and a description of their origin."""
    if split_tags is not None:
        parts = {s: np.flatnonzero(split_tags == s) for s in ("train", "val", "test")}
        if len(parts["train"]) == 0:
            raise DataError("the dataset's own split has no training images")
        origin = "dataset"
        if len(parts["val"]) == 0:
            carved = stratified_split(labels, {"train": 1 - val_fraction, "val": val_fraction}, seed,
                                      tiny_class_policy, class_names, base=parts["train"])
            parts["train"], parts["val"] = carved["train"], carved["val"]
            origin = "dataset (val carved from train, stratified)"
        if len(parts["test"]) == 0:
            raise DataError("the dataset's own split has no test images; remove the split or add a test part")
        return parts, origin
    fr = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    parts = stratified_split(labels, fr, seed, tiny_class_policy, class_names)
    for k in ("val", "test"):
        parts.setdefault(k, np.array([], dtype=np.int64))
    return parts, f"stratified (seed {seed})"


def longtail_subsample(indices: np.ndarray, labels: np.ndarray, imbalance_ratio: float,
                       seed: int) -> np.ndarray:
    """Exponential long-tail profile: the i-th most frequent class keeps
    ``n_max · ratio^(−i/(C−1))`` samples (capped at what it has)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[indices], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    n_max = counts[order[0]]
    keep = []
    for rank, ci in enumerate(order):
        c = classes[ci]
        target = int(np.floor(n_max * imbalance_ratio ** (-rank / max(len(classes) - 1, 1))))
        idx = indices[labels[indices] == c]
        keep.append(rng.choice(idx, size=min(max(target, 1), len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


def cap_per_class(indices: np.ndarray, labels: np.ndarray, cap: int | dict[int, int], seed: int) -> np.ndarray:
    """Keep at most ``cap`` samples of each class (an int, or a per-class dict)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels[indices]):
        idx = indices[labels[indices] == c]
        k = cap.get(int(c), len(idx)) if isinstance(cap, dict) else cap
        keep.append(idx if len(idx) <= k else rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(keep))


def stratified_fraction(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Keep ``fraction`` of every class (at least one sample each)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels[indices]):
        idx = indices[labels[indices] == c]
        keep.append(rng.choice(idx, size=max(1, int(round(len(idx) * fraction))), replace=False))
    return np.sort(np.concatenate(keep))


def stratified_cap(indices: np.ndarray, labels: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    if len(indices) <= max_samples:
        return indices
    return stratified_fraction(indices, labels, max_samples / len(indices), seed)


def balanced_cap_default(indices: np.ndarray, labels: np.ndarray) -> int:
    """Default cap of the protocols' balanced subset: the median class count of the training
    split (UMKD subsamples only the largest grades; capping at the median does the same)."""
    return int(np.median(np.unique(labels[indices], return_counts=True)[1]))


def protocol_indices(train: np.ndarray, labels: np.ndarray, protocol: str, role: str,
                     cap: dict[int, int] | None, seed: int) -> np.ndarray:
    """UMKD protocols, carved from the training split only.

    ``source-imbalanced``: teachers train on the full (imbalanced) training split, the student on
    a balanced subset of it. ``target-imbalanced``: the reverse. ``role`` is "teacher" or "student".
    """
    if protocol == "none":
        return train
    balanced_side = "student" if protocol == "source-imbalanced" else "teacher"
    if role != balanced_side:
        return train
    return cap_per_class(train, labels, cap if cap else balanced_cap_default(train, labels), seed)


def _check_groups(labels: np.ndarray, groups: np.ndarray, class_names: list[str] | None) -> None:
    """A class whose images all belong to one group can never be both trained on and tested."""
    for c in np.unique(labels):
        g = np.unique(groups[labels == c])
        if len(g) == 1:
            name = class_names[c] if class_names else str(c)
            raise DataError(f"every image of class {name!r} belongs to group {str(g[0])!r}: a grouped split cannot put "
                            "that class in train and in val/test; add images of other patients or drop the class")


def _group_fold(labels: np.ndarray, groups: np.ndarray, base: np.ndarray, n_splits: int, seed: int,
                fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held-out) of ``base``: fold ``fold`` of scikit-learn's StratifiedGroupKFold, which
    keeps groups whole and class proportions as close as the groups allow."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups[base]))
    if n_groups < n_splits:
        raise DataError(f"{n_groups} groups cannot make {n_splits} group-disjoint parts; lower the number of folds "
                        "or the held-out fractions, or add patients")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest, held = list(cv.split(np.zeros(len(base)), labels[base], groups[base]))[fold]
    return np.sort(base[rest]), np.sort(base[held])


def grouped_split(labels: np.ndarray, groups: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                  class_names: list[str] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Train/val/test with every group (patient, study) inside one part, stratified as far as
    the groups allow. Test is one fold of ``round(1/test_fraction)``, val one fold of what is
    left. Returns the parts and notes on fractions the groups did not allow (reported, and
    saved in ``split.json``)."""
    _check_groups(labels, groups, class_names)
    n = len(labels)
    notes: list[str] = []
    base = np.arange(n)
    parts: dict[str, np.ndarray] = {}
    if test_fraction > 0:
        base, parts["test"] = _group_fold(labels, groups, base, max(2, round(1 / test_fraction)), seed)
    if val_fraction > 0:
        k = max(2, round((len(base) / n) / val_fraction))
        base, parts["val"] = _group_fold(labels, groups, base, k, seed + 1)
    parts["train"] = base
    for k, f in (("val", val_fraction), ("test", test_fraction)):
        if k in parts and f > 0:
            got = len(parts[k]) / n
            if abs(got - f) > 0.5 * f:
                ids, counts = np.unique(groups, return_counts=True)
                big = ids[np.argmax(counts)]
                notes.append(f"{k} holds {got:.1%} of the images instead of {f:.0%}: groups are too large for the "
                             f"requested fraction (largest group {str(big)!r}: {counts.max()} images)")
    return parts, notes


def fold_split(labels: np.ndarray, pool: np.ndarray, folds: int, fold: int, seed: int,
               groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) of cross-validation fold ``fold`` of ``folds`` over the training ``pool``
    (train ∪ val; test is never touched): stratified, and group-disjoint when ``groups`` is given."""
    if not 0 <= fold < folds:
        raise DataError(f"fold {fold} does not exist: data.folds={folds} gives folds 0…{folds - 1}")
    if groups is not None:
        return _group_fold(labels, groups, np.sort(pool), folds, seed, fold)
    from sklearn.model_selection import StratifiedKFold

    pool = np.sort(pool)
    small = np.bincount(labels[pool]).astype(float)
    if (small[small > 0] < folds).any():
        c = int(np.flatnonzero((small > 0) & (small < folds))[0])
        raise DataError(f"class {c} has {int(small[c])} training image(s), fewer than the {folds} folds")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    tr, va = list(cv.split(np.zeros(len(pool)), labels[pool]))[fold]
    return pool[tr], pool[va]


def check_fixed_splits(record: dict[str, Any], source: "ImageSource") -> dict[str, np.ndarray]:
    """A saved split (``split.json``) must fit ``source``: integer indices in range, the three
    splits disjoint, and — when recorded — the same dataset fingerprint. Anything else would
    silently score other images (negative indices wrap around) or leak train into test."""
    fp = record.get("fingerprint")
    if fp and source.fingerprint and fp != source.fingerprint:
        raise DataError(f"the saved split was made for another version of the data ({record.get('source', '?')}, "
                        f"fingerprint {fp[:12]}…) than {source.description} ({source.fingerprint[:12]}…)")
    splits = {}
    for k in ("train", "val", "test"):
        if k not in record:
            raise DataError(f"the saved split has no {k!r} list")
        try:
            v = np.asarray(record[k])
        except (TypeError, ValueError) as e:
            raise DataError(f"the saved split's {k!r} entry is not a list of indices ({e})") from e
        if v.size and (v.ndim != 1 or not np.issubdtype(v.dtype, np.integer)):
            raise DataError(f"the saved split's {k!r} entry must be a flat list of integers")
        v = v.astype(np.int64)
        if v.size and (v.min() < 0 or v.max() >= len(source)):
            bad = int(v.min()) if v.min() < 0 else int(v.max())
            raise DataError(f"the saved split's {k!r} holds index {bad}, outside the dataset's 0…{len(source) - 1} "
                            f"({source.description}; other data?)")
        if len(np.unique(v)) != len(v):
            raise DataError(f"the saved split's {k!r} lists an image more than once")
        splits[k] = v
    if "unlabeled" in record:   # bounds checked where the unlabelled images are opened
        splits["unlabeled"] = np.asarray(record["unlabeled"], dtype=np.int64).reshape(-1)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        common = np.intersect1d(splits[a], splits[b])
        if len(common):
            raise DataError(f"the saved split puts image {int(common[0])} (and {len(common) - 1} more) in both {a} and {b}")
    return splits


def new_splits(cfg: DataConfig, source: ImageSource, role: str, notes: list[str]) -> tuple[dict[str, np.ndarray], str]:
    """A new split of ``source`` (grouped by patient where the data has groups; a CV fold) with
    the imbalance tools and label fraction applied to train; returns it and its origin."""
    if source.groups is not None and source.split_tags is None:
        splits, group_notes = grouped_split(source.labels, source.groups, cfg.val_fraction, cfg.test_fraction,
                                               cfg.split_seed, source.class_names)
        notes += group_notes
        origin = f"grouped by patient/study, stratified (seed {cfg.split_seed})"
    else:
        splits, origin = make_splits(source.labels, source.split_tags, cfg.val_fraction,
                                        cfg.test_fraction, cfg.split_seed, cfg.tiny_class_policy,
                                        source.class_names)
    if cfg.folds:
        pool = np.concatenate([splits["train"], splits["val"]])
        splits["train"], splits["val"] = fold_split(source.labels, pool, cfg.folds, cfg.fold, cfg.split_seed,
                                                       source.groups)
        origin += f"; cross-validation fold {cfg.fold} of {cfg.folds} (test untouched)"
    if source.groups is not None:
        check_group_leak(splits, source.groups)
    if cfg.skip_corrupt and not source.in_memory:
        splits = {k: scan_corrupt(source, v) for k, v in splits.items()}
    splits["train"] = _train_subset(splits["train"], source.labels, cfg, role)
    _label_fraction(cfg, source, splits, notes)
    if cfg.max_eval_samples:
        for k in ("val", "test"):
            splits[k] = stratified_cap(splits[k], source.labels, cfg.max_eval_samples, cfg.split_seed)
    return splits, origin

def scan_corrupt(source: ImageSource, idx: np.ndarray) -> np.ndarray:
    """Drop unreadable images with a warning naming each (``data.skip_corrupt``)."""
    keep = []
    for i in idx:
        try:
            source.load(int(i))
            keep.append(i)
        except DataError as e:
            warnings.warn(f"skipping: {e}", stacklevel=2)
    return np.array(keep, dtype=np.int64)

def _label_fraction(cfg: DataConfig, source: ImageSource, splits: dict[str, np.ndarray], notes: list[str]) -> None:
    """``data.label_fraction``: keep that stratified, seeded share of the training labels; the
    other training images become the unlabelled pool."""
    if cfg.label_fraction is None or cfg.label_fraction >= 1.0:
        return
    keep = stratified_fraction(splits["train"], source.labels, cfg.label_fraction, cfg.split_seed)
    splits["unlabeled"] = np.setdiff1d(splits["train"], keep)
    splits["train"] = keep
    notes.append(f"data.label_fraction={cfg.label_fraction:g}: {len(keep)} training images keep their label, "
                 f"{len(splits['unlabeled'])} join the unlabelled pool")

def _train_subset(tr: np.ndarray, y: np.ndarray, cfg: DataConfig, role: str) -> np.ndarray:
    """The imbalance tools, on the training split only: the protocol's side, a long tail, caps,
    fractions (val and test are never touched)."""
    s = cfg.subset
    tr = protocol_indices(tr, y, cfg.protocol, role, cfg.protocol_cap, s.seed)
    if s.imbalance_ratio:
        tr = longtail_subsample(tr, y, s.imbalance_ratio, s.seed)
    if s.max_per_class:
        tr = cap_per_class(tr, y, s.max_per_class, s.seed)
    if s.fraction:
        tr = stratified_fraction(tr, y, s.fraction, s.seed)
    if s.max_samples:
        tr = stratified_cap(tr, y, s.max_samples, s.seed)
    return tr

def check_group_leak(splits: dict[str, np.ndarray], groups: np.ndarray) -> None:
    """No patient/study may appear in two splits (e.g. a dataset's own split that ignores them)."""
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        common = np.intersect1d(groups[splits[a]], groups[splits[b]])
        if len(common):
            raise DataError(f"group {str(common[0])!r} (and {len(common) - 1} more) has images in both {a} and {b}: the "
                            "split leaks patients/studies; remove the predefined split column/folders to split by group")
