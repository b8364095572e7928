"""Datasets (MedMNIST, folders, CSV), splits, imbalance tools and transforms."""

from medistill.data.dataset import DataBundle, ImageDataset, build_data
from medistill.data.sources import ImageSource, open_source
from medistill.data.splits import (cap_per_class, class_counts, longtail_subsample, make_splits,
                                   protocol_indices, stratified_split)

__all__ = ["DataBundle", "ImageDataset", "ImageSource", "build_data", "cap_per_class", "class_counts",
           "longtail_subsample", "make_splits", "open_source", "protocol_indices", "stratified_split"]
