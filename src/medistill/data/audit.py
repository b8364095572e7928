"""Data audit: exact copies (within and across splits, and with different labels), near-duplicates
by perceptual hash, per-split class counts and image shapes. Likely label errors, which need a
model's out-of-sample probabilities, are in :mod:`medistill.eval.label_issues`.

Exact copies are grouped by a hash of the decoded pixels (``decode=True``; what ``medistill audit``
does) or, for a training run's quick check, of the file bytes (no decoding: cheap on a large
folder, blind to re-encoded copies). A group whose members carry different labels is a *label
conflict*: the same image under two diagnoses is no label at all.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from medistill.data.sources import ImageSource
from medistill.errors import MedistillError
from medistill.io import cache_root, write_json

SPLITS = ("train", "val", "test")
# imagehash's 64-bit pHash; pairs at Hamming distance ≤ this are near-duplicates. 4 of 64 bits is
# the usual cut for "the same photograph, re-encoded or slightly resized" (stated in the docs).
NEAR_THRESHOLD = 4


@dataclass
class CopyGroup:
    """Images with identical content: source indices, the split of each, the label of each."""

    indices: list[int]
    splits: list[str]
    labels: list[int]

    @property
    def conflict(self) -> bool:
        return len(set(self.labels)) > 1


def split_of(splits: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Each source image's split name ("" where the run does not use it)."""
    out = np.full(n, "", dtype=object)
    for k in SPLITS:
        out[np.asarray(splits[k], dtype=np.int64)] = k
    return out


def content_hash(source: ImageSource, i: int, decode: bool) -> str:
    if source.in_memory or decode:
        return hashlib.sha1(np.ascontiguousarray(source.load(i)).tobytes()).hexdigest()
    with open(source.path(i), "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def file_digests(source: ImageSource, indices: list[int], decode: bool = False) -> dict[int, str]:
    """The content hash of each of ``indices`` (file bytes; decoded pixels with ``decode``),
    remembered under the source's fingerprint (every file's path, label, size and modification
    time) in ``cache_root()/file_digests``: a folder's files are read once, not at every run start
    (16k 512-px JPEGs: ≈ 2 s of every start on a 2-core CPU, growing with the folder). A cache
    that cannot be written is skipped; an array's pixels are hashed directly (no file to read)."""
    if source.in_memory:
        return {i: content_hash(source, i, decode=False) for i in indices}
    # decoded pixels depend on the channels they are read with (a grey file read as RGB)
    name = f"{source.fingerprint}-pixels{source.channels}.json" if decode else f"{source.fingerprint}.json"
    path = cache_root() / "file_digests" / name
    known: dict[str, str] = {}
    if source.fingerprint and path.is_file():
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):   # a damaged cache is recomputed and rewritten
            known = {}
        if not isinstance(known, dict):
            known = {}
    missing = [i for i in indices if str(i) not in known]
    known.update({str(i): content_hash(source, i, decode=decode) for i in missing})
    if source.fingerprint and missing:
        try:
            write_json(path, known)
        except (OSError, MedistillError):   # a read-only cache: the digests are recomputed next time
            pass
    return {i: known[str(i)] for i in indices}


def copy_groups(source: ImageSource, splits: dict[str, np.ndarray], decode: bool = False) -> list[CopyGroup]:
    """Every set of ≥ 2 images of the splits with the same content."""
    where = split_of(splits, len(source))
    members = [int(i) for k in SPLITS for i in splits[k]]
    if source.in_memory or decode:
        digests = {i: content_hash(source, i, decode) for i in members}
    else:
        digests = file_digests(source, members)
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i in members:
        by_hash[digests[i]].append(i)
    return [CopyGroup(sorted(ix), [str(where[i]) for i in sorted(ix)], [int(source.labels[i]) for i in sorted(ix)])
            for ix in by_hash.values() if len(ix) > 1]


def summarize_copies(groups: list[CopyGroup], names: list[str]) -> dict[str, Any]:
    """Counts a person can act on: label conflicts by label pair, copies across splits by pair
    (images of the later split that copy one of an earlier split), copies within a split."""
    conflicts: Counter[str] = Counter()
    across: Counter[str] = Counter()
    within: Counter[str] = Counter()
    order = {s: n for n, s in enumerate(SPLITS)}
    for g in groups:
        if g.conflict:
            conflicts[" / ".join(names[c] for c in sorted(set(g.labels)))] += 1
        first = min(g.splits, key=order.__getitem__)
        for s, n in Counter(g.splits).items():
            if s != first:
                across[f"{s} copies {first}"] += n
        for s, n in Counter(g.splits).items():
            if n > 1:
                within[s] += n - 1
    return {"label_conflict_groups": sum(conflicts.values()),
            "label_conflict_images": sum(len(g.indices) for g in groups if g.conflict),
            "label_conflicts": dict(conflicts), "across_splits": dict(across), "within_split": dict(within)}


def one_line(summary: dict[str, Any], name: str) -> str | None:
    """The sentence a training run prints when the quick check finds something; None when clean."""
    parts = []
    if summary["label_conflict_groups"]:
        pairs = ", ".join(f"{n} {k}" for k, n in sorted(summary["label_conflicts"].items(), key=lambda kv: -kv[1]))
        parts.append(f"{summary['label_conflict_groups']} images carry two labels ({pairs})")
    if summary["across_splits"]:
        parts.append("copies across splits: " + ", ".join(f"{n} {k}" for k, n in sorted(summary["across_splits"].items())))
    if not parts:
        return None
    return (f"data audit of {name}: " + "; ".join(parts)
            + " — `medistill audit` lists them; data.duplicates=drop removes them")


def drop_copies(groups: list[CopyGroup], splits: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """``data.duplicates: drop``: every image of a label conflict leaves every split; of other
    copies, those in a later split than the first copy (val/test copies of training images, test
    copies of validation images) leave. Returns the new splits and what was dropped."""
    order = {s: n for n, s in enumerate(SPLITS)}
    conflict = {i for g in groups if g.conflict for i in g.indices}
    copies = set()
    for g in groups:
        if g.conflict:
            continue
        first = min(order[s] for s in g.splits)
        copies |= {i for i, s in zip(g.indices, g.splits) if order[s] > first}
    gone = conflict | copies
    new = {k: (np.array([i for i in v if int(i) not in gone], dtype=np.int64) if k in SPLITS else v)
           for k, v in splits.items()}
    return new, {"label_conflicts": sorted(conflict), "cross_split_copies": sorted(copies)}


def perceptual_hashes(source: ImageSource, indices: np.ndarray) -> np.ndarray:
    """64-bit pHash (imagehash) of each image, as uint64 ``[N]``."""
    import imagehash
    from PIL import Image

    out = np.zeros(len(indices), dtype=np.uint64)
    for k, i in enumerate(indices):
        arr = source.load(int(i))
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        bits = imagehash.phash(img).hash.flatten()
        out[k] = np.uint64(int("".join("1" if b else "0" for b in bits), 2))
    return out


def near_pairs(hashes: np.ndarray, threshold: int = NEAR_THRESHOLD) -> list[tuple[int, int, int]]:
    """Pairs ``(a, b, distance)`` of positions whose hashes differ in ≤ ``threshold`` bits.

    imagehash gives the hashes but no neighbour search, and all pairs cost N² (5·10⁹ at 100k
    images), so this uses the pigeonhole rule: split the 64 bits into ``threshold + 1`` chunks;
    two hashes within ``threshold`` bits agree exactly on at least one chunk. Only images sharing a
    chunk value are compared.
    """
    n_chunks = threshold + 1
    bounds = np.linspace(0, 64, n_chunks + 1).astype(int)
    found: dict[tuple[int, int], int] = {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        key = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        buckets: dict[int, list[int]] = defaultdict(list)
        for pos, v in enumerate(key.tolist()):
            buckets[v].append(pos)
        for members in buckets.values():
            if len(members) < 2:
                continue
            m = np.array(members)
            x = hashes[m][:, None] ^ hashes[m][None, :]
            dist = np.array([[bin(int(v)).count("1") for v in row] for row in x])
            a, b = np.nonzero(np.triu(dist <= threshold, 1))
            for p, q in zip(a.tolist(), b.tolist()):
                found[(int(m[p]), int(m[q]))] = int(dist[p, q])
    return sorted((a, b, d) for (a, b), d in found.items())


def class_table(source: ImageSource, splits: dict[str, np.ndarray]) -> dict[str, Any]:
    """Images per class per split, and the classes a split lacks."""
    counts = {k: np.bincount(source.labels[splits[k]], minlength=source.num_classes).tolist() for k in SPLITS}
    missing = {k: [source.class_names[c] for c, n in enumerate(v) if n == 0] for k, v in counts.items()}
    return {"classes": source.class_names, "counts": counts, "missing": {k: v for k, v in missing.items() if v}}


def shapes_seen(source: ImageSource, indices: np.ndarray) -> dict[str, int]:
    """How many images have each size and channel layout as stored: ``H×W×C`` of an array, or
    ``W×H MODE`` from an image file's header (PIL's mode: L grey, RGB, I;16 …; DICOM: its header)."""
    if source.in_memory:
        h, w, c = source.array.shape[1:]
        return {f"{h}×{w}×{c}": len(indices)}
    from PIL import Image

    from medistill.data.imageio import DICOM_SUFFIXES, dicom_header

    seen: Counter[str] = Counter()
    for i in indices:
        p = source._paths[int(i)]
        if p.suffix.lower() in DICOM_SUFFIXES:
            h = dicom_header(p)
            seen[f"{h['columns']}×{h['rows']} DICOM {h['channels']}ch"] += 1
            continue
        try:
            with Image.open(p) as img:
                seen[f"{img.size[0]}×{img.size[1]} {img.mode}"] += 1
        except (OSError, Image.DecompressionBombError):
            seen["unreadable"] += 1
    return dict(seen)
