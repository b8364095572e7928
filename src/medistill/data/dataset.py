"""Map-style dataset over an image source and an index array, plus the data bundle a run uses."""

from __future__ import annotations


import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler

from medistill.config import DataConfig
from medistill.data import audit
from medistill.data import splits as sp
from medistill.data.checks import missing_eval_classes, shape_note
from medistill.data.splits import check_fixed_splits
from medistill.data.sources import ImageSource, open_source
from medistill.data.unlabeled import UNLABELED, add_unlabeled, pool_identity
from medistill.data.transforms import Augment, FixedCrops, image_tensor, unit, view_of
from medistill.errors import DataError


class ImageDataset(Dataset):
    """Items are ``(x [C, S, S] float in [0, 1], label, index, view id)``.

    Indices ``≥ len(source)`` are images ``index − len(source)`` of ``extra`` (the unlabelled
    images of ``data.unlabeled``); items from position ``hidden_from`` on carry the label −1 (the
    training images ``data.label_fraction`` moved to the unlabelled pool, and ``extra``'s).
    With ``views`` (a teacher cache being built), ``x`` is every listed view of the image
    ``[V, C, S, S]``, from one decode.
    """

    def __init__(self, source: ImageSource, indices: np.ndarray, size: int, augment: Augment | None,
                 extra: ImageSource | None = None, hidden_from: int | None = None,
                 views: list[int] | None = None, fixed: FixedCrops | None = None):
        self.source, self.indices, self.size, self.augment = source, np.asarray(indices), size, augment
        self.extra, self.hidden_from = extra, hidden_from
        self.views, self.fixed = views, fixed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, int, int]:
        i = int(self.indices[k])
        n = len(self.source)
        src, j = (self.source, i) if i < n or self.extra is None else (self.extra, i - n)
        arr = src.load(j, min_side=self.size)   # JPEGs decode at a reduced scale when much larger
        x = image_tensor(arr, self.size)         # uint8 [C, S, S]
        view = 0
        if self.views is not None:
            x = unit(x)
            x = torch.stack([view_of(x, i, v, self.fixed) for v in self.views])
        elif self.augment is not None:
            x, view = self.augment(x, i)
        else:
            x = unit(x)
        hidden = self.hidden_from is not None and k >= self.hidden_from
        return x, (UNLABELED if hidden else int(src.labels[j])), i, view


@dataclass
class DataBundle:
    """A source, its splits (already reduced by the imbalance tools) and loader factories."""

    cfg: DataConfig
    source: ImageSource
    splits: dict[str, np.ndarray]
    split_origin: str
    image_size: int
    pin_memory: bool = False      # page-locked batches for asynchronous copies to a CUDA device
    split_notes: list[str] | None = None   # fractions the patient groups did not allow, etc.
    device: torch.device | None = None     # where data.resident keeps the images (the training device)
    unlabeled: ImageSource | None = None   # data.unlabeled's images: indices len(source) + j
    fixed_crops: FixedCrops | None = None  # standard augmentation drawn from fixed crops (a cached teacher)
    _resident: torch.Tensor | None = None

    def use_fixed_crops(self, k: int, seed: int) -> FixedCrops:
        """From now on ``standard`` augmentation draws from ``k`` fixed crops per image."""
        self.fixed_crops = FixedCrops(self.index_size, k, seed)
        return self.fixed_crops

    def eval_batch(self, batch_size: int, max_mb: float, views: int = 1) -> int:
        """``batch_size`` capped so one batch of ``views`` float32 views per image at the data
        size stays under ``max_mb`` MiB (a count alone is 150 MB at 224 px, 800 MB at 512)."""
        per_image = views * self.channels * self.image_size ** 2 * 4
        return max(1, min(batch_size, int(max_mb * 2**20 // per_image)))

    @property
    def index_size(self) -> int:
        """How many image ids there are: the labelled source's, then the unlabelled images'."""
        return len(self.source) + (len(self.unlabeled) if self.unlabeled is not None else 0)

    @property
    def has_unlabeled(self) -> bool:
        return len(self.splits.get("unlabeled", ())) > 0

    def train_indices(self, unlabeled: bool = False) -> np.ndarray:
        """The training images' ids; with ``unlabeled``, followed by the unlabelled pool's."""
        tr = self.splits["train"]
        return np.concatenate([tr, self.splits["unlabeled"]]) if unlabeled and self.has_unlabeled else tr

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.source.class_names

    @property
    def channels(self) -> int:
        return self.source.channels

    @property
    def ordinal(self) -> bool:
        """Ordered grades (QWK is reported) or nominal classes (``data.ordinal``)."""
        if self.cfg.ordinal != "auto":
            return bool(self.cfg.ordinal)
        from medistill.data.medmnist import is_ordinal

        return self.source.in_memory and is_ordinal(self.cfg.name)

    def counts(self, split: str = "train") -> np.ndarray:
        return sp.class_counts(self.source.labels[self.splits[split]], self.num_classes)

    def labels(self, split: str) -> np.ndarray:
        return self.source.labels[self.splits[split]]

    def dataset(self, split: str, train: bool, unlabeled: bool = False, views: list[int] | None = None) -> ImageDataset:
        """The images of ``split``; ``unlabeled`` (training split only) appends the unlabelled pool;
        ``views``: each item is those views of its image (building a teacher cache)."""
        aug = Augment(self.cfg.augment, self.image_size, self.fixed_crops) if train and self.cfg.augment != "none" else None
        extra = dict(views=views, fixed=self.fixed_crops)
        if unlabeled and split == "train" and self.has_unlabeled:
            return ImageDataset(self.source, self.train_indices(True), self.image_size, aug, self.unlabeled,
                                hidden_from=len(self.splits["train"]), **extra)
        return ImageDataset(self.source, self.splits[split], self.image_size, aug, **extra)

    def workers(self) -> dict[str, Any]:
        """DataLoader worker settings: ``data.num_workers`` (auto: min(8, CPUs/2) beside a GPU; on
        a CPU device one worker for image files — decoding then overlaps the training step, 1.2×
        the images/s of none on 2 cores (docs/benchmarks.md "scale") — and none for an array in
        memory, where a worker only takes a core from the training threads), persistent workers
        and ``data.prefetch_factor``, page-locked memory for CUDA."""
        n = self.cfg.num_workers
        if n == "auto":
            dev = self.device.type if self.device is not None else "cpu"
            n = (0 if self.source.in_memory else 1) if dev == "cpu" else min(8, max(1, (os.cpu_count() or 2) // 2))
        extra = {"persistent_workers": True, "prefetch_factor": self.cfg.prefetch_factor} if n else {}
        return {"num_workers": n, "pin_memory": self.pin_memory, **extra}

    def use_resident(self) -> bool:
        """``data.resident``: on, off, or auto — on for a CUDA device when the array is in memory
        and takes under a quarter of the free device memory."""
        mode = self.cfg.resident
        if mode != "auto":
            return mode == "on"
        dev = self.device
        if dev is None or dev.type != "cuda" or not self.source.in_memory:
            return False
        free, _total = torch.cuda.mem_get_info(dev)
        return self.source.array.nbytes < 0.25 * free

    def resident_loader(self, split: str, batch_size: int, seed: int, balanced: bool, drop_last: bool):
        """The training loader of ``data.resident``: images copied to the device once."""
        from medistill import dist
        from medistill.data.resident import ResidentLoader

        if not self.source.in_memory:
            raise DataError(f"data.resident needs an in-memory dataset (a MedMNIST .npz); {self.source.description} "
                            "is read from files")
        dev = self.device or torch.device("cpu")
        need = self.source.array.nbytes
        if dev.type == "cuda" and self._resident is None:
            free, _total = torch.cuda.mem_get_info(dev)
            if need > 0.9 * free:
                raise DataError(f"data.resident: the images take {need / 2**20:.0f} MiB but {dev} has "
                                f"{free / 2**20:.0f} MiB free; set data.resident=off")
        if self._resident is None:
            self._resident = torch.from_numpy(self.source.array).permute(0, 3, 1, 2).contiguous().to(dev)
        labels = torch.as_tensor(self.source.labels).to(dev)
        weights = None
        if balanced:
            weights = torch.as_tensor(1.0 / self.counts(split)[self.labels(split)], dtype=torch.double)
        aug = None if self.cfg.augment == "none" else self.cfg.augment
        return ResidentLoader(self._resident, labels, self.splits[split], self.image_size, batch_size, aug, seed,
                              shuffle=True, drop_last=drop_last, sample_weights=weights, rank=dist.rank(),
                              world=dist.world(), fixed=self.fixed_crops)

    def loader(self, split: str, batch_size: int, train: bool, seed: int = 0,
               balanced: bool | None = None, drop_last: bool = False, unlabeled: bool = False) -> DataLoader:
        """``unlabeled``: the training split with the unlabelled pool (``data.unlabeled_ratio``
        sets each batch's mix; default one shuffled pass over both)."""
        from medistill import dist

        unlabeled = unlabeled and self.has_unlabeled
        if train and self.use_resident() and not unlabeled:
            bal = self.cfg.balanced_sampler if balanced is None else balanced
            return self.resident_loader(split, batch_size, seed, bal, drop_last)  # type: ignore[return-value]
        ds = self.dataset(split, train, unlabeled)
        if len(ds) == 0:
            raise DataError(f"the {split} split is empty")
        gen = torch.Generator().manual_seed(seed)
        sampler = None
        balanced = self.cfg.balanced_sampler if balanced is None else balanced
        if unlabeled and self.cfg.unlabeled_ratio is not None:
            from medistill.data.mixed import MixedBatchSampler

            if dist.world() > 1:
                raise DataError("data.unlabeled_ratio is not supported with distributed training yet; leave it unset "
                                "(one shuffled pass over labelled and unlabelled images)")
            bs = MixedBatchSampler(len(self.splits["train"]), len(self.splits["unlabeled"]), batch_size,
                                   self.cfg.unlabeled_ratio, seed)
            return DataLoader(ds, batch_sampler=bs, **self.workers())
        if dist.world() > 1:
            if not train:
                # Evaluation shards without padding; predictions are gathered and ordered by index.
                shard = Subset(ds, list(range(dist.rank(), len(ds), dist.world())))
                loader = DataLoader(shard, batch_size=batch_size, shuffle=False, **self.workers())
                loader.medistill_sharded = True  # type: ignore[attr-defined]
                return loader
            if balanced:
                raise DataError("data.balanced_sampler is not supported with distributed training yet")
            sampler = DistributedSampler(ds, shuffle=True, seed=seed, drop_last=drop_last)
            return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **self.workers())
        if train and balanced:
            counts = self.counts(split)
            w = 1.0 / counts[self.labels(split)]
            sampler = WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(ds),
                                            replacement=True, generator=gen)
        return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                          generator=gen, drop_last=drop_last, **self.workers())

    def train_items(self, unlabeled: bool = False) -> int:
        """Images in one training epoch (the unlabelled pool's too when ``unlabeled`` and no ratio)."""
        n = len(self.splits["train"])
        if unlabeled and self.has_unlabeled and self.cfg.unlabeled_ratio is None:
            n += len(self.splits["unlabeled"])
        return n

    def card_info(self, pool_terms: Any = None) -> dict[str, Any]:
        """What a model card and summary say about the data: its source, fingerprint, images per
        class per split and, when ``pool_terms`` (the run's term modules) learn from the unlabelled
        pool, its source, size and the label-free terms."""
        info = {"source": self.source.description, "fingerprint": self.source.fingerprint or None,
                "counts": {k: self.counts(k).tolist() for k in ("train", "val", "test")}}
        if pool_terms is not None and self.has_unlabeled:
            info["unlabeled"] = {"source": self.unlabeled.description if self.unlabeled is not None else
                                 f"{self.source.description} (data.label_fraction: the training images without labels)",
                                 "images": int(len(self.splits["unlabeled"])),
                                 "terms": ", ".join(k.replace("__", ".") for k, t in pool_terms.items() if not t.uses_labels())}
        return info

    def pool_kept(self) -> np.ndarray:
        """The ids (within ``data.unlabeled``) of the pool images this run uses."""
        u = self.splits["unlabeled"]
        return u[u >= len(self.source)] - len(self.source)

    def split_record(self) -> dict[str, Any]:
        return {
            "origin": self.split_origin, "source": self.source.description, "notes": self.split_notes or [],
            "fingerprint": self.source.fingerprint, "class_names": self.class_names,
            "counts": {k: self.counts(k).tolist() for k in ("train", "val", "test")},
            **{k: v.tolist() for k, v in self.splits.items()},
            **({"unlabeled_source": pool_identity(self.unlabeled, self.pool_kept())} if self.unlabeled is not None else {}),
        }


def build_data(cfg: DataConfig, image_size: int | None = None, role: str = "student",
               download: bool = False, fixed_splits: dict[str, Any] | None = None, open_pool: bool = True) -> DataBundle:
    """Open the dataset, split it, apply the imbalance tools to train (never to val/test).

    ``fixed_splits`` (e.g. a run's saved ``split.json``) replaces the split computation so that
    evaluation and resumption see exactly the same images. ``open_pool=False``: ``data.unlabeled`` is
    not opened (what scores a trained model never reads it).
    """
    source = open_source(cfg.name, cfg.format, download=download)
    if cfg.class_names is not None:
        if len(cfg.class_names) != source.num_classes or len(set(cfg.class_names)) != len(cfg.class_names):
            raise DataError(f"data.class_names lists {len(cfg.class_names)} names but {source.description} has "
                            f"{source.num_classes} classes (names must be distinct)")
        source.class_names = [str(c) for c in cfg.class_names]
    source.window = tuple(cfg.window) if cfg.window else None
    source.dicom_frame = cfg.dicom_frame
    if cfg.group_pattern:
        source.groups = source.groups_from_pattern(cfg.group_pattern)
    elif cfg.group_by == "dicom_patient_id":
        source.groups = source.dicom_patient_ids()
    notes: list[str] = list(source.notes)
    if fixed_splits is not None:
        splits = check_fixed_splits(fixed_splits, source)
        origin = "saved split"
    else:
        splits, origin = sp.new_splits(cfg, source, role, notes)
    for k in ("train", "val", "test"):
        if len(splits[k]) == 0:
            raise DataError(f"the {k} split of {source.description} is empty (check val/test fractions)")
    # evaluate/explain/export (open_pool=False) never open the pool: they only score labelled splits
    saved_pool = fixed_splits.get("unlabeled_source") if fixed_splits is not None else None
    unl = add_unlabeled(cfg, source, splits, fixed_splits is None, notes, saved_pool) if open_pool else None
    splits.setdefault("unlabeled", np.empty(0, dtype=np.int64))
    if source.native_size is None and fixed_splits is None:
        shape_note(source, splits, notes)
    if cfg.duplicates != "off" and fixed_splits is None:
        splits = _check_copies(cfg, source, splits, notes)
    if fixed_splits is None:
        missing_eval_classes(source, splits, notes)
    size = image_size or source.default_size
    return DataBundle(cfg, source, splits, origin, size, split_notes=notes, unlabeled=unl)


def _check_copies(cfg: DataConfig, source: ImageSource, splits: dict[str, np.ndarray], notes: list[str]) -> dict[str, np.ndarray]:
    """``data.duplicates``: the quick audit (pixels of an array, bytes of files) of copies across
    splits and label conflicts; its one line goes into ``notes`` (the run prints it); ``error``
    refuses, ``drop`` removes the conflicting images and the later split's copies."""
    groups = audit.copy_groups(source, splits)
    line = audit.one_line(audit.summarize_copies(groups, source.class_names), source.description)
    if line is None:
        return splits
    if cfg.duplicates == "error":
        raise DataError(line + "; or set data.duplicates=warn to go on")
    if cfg.duplicates == "drop":
        splits, dropped = audit.drop_copies(groups, splits)
        splits["dropped"] = np.array(sorted(dropped["label_conflicts"] + dropped["cross_split_copies"]), dtype=np.int64)
        notes.append(f"data.duplicates=drop: removed {len(dropped['label_conflicts'])} label-conflicting image(s) and "
                     f"{len(dropped['cross_split_copies'])} copies in a later split ({source.description})")
    else:
        notes.append(line)
    return splits
