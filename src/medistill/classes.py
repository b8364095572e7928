"""Class lists: when two recorded lists of class names mean the same classes. A neutral module
(no torch, no data reader) that data, models, run directories and the engine all use."""

from __future__ import annotations


def same_classes(a: list[str], b: list[str]) -> bool:
    """Whether two recorded class lists mean the same classes. Runs made before MedMNIST class
    names were recorded list the label ids ("0", "1", …) instead; those match any list of the
    same length, so older teachers stay usable."""
    if a == b:
        return True
    ids = [str(i) for i in range(len(a))]
    return len(a) == len(b) and (a == ids or b == ids)
