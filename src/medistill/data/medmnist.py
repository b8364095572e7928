"""MedMNIST ``.npz`` files: name resolution, checksum verification, download.

A name such as ``retinamnist`` or ``breastmnist_64`` resolves through, in order: an explicit
path, ``$MEDISTILL_DATA_DIR``, then the user cache directory. A missing file is downloaded only
when the caller asks (``download=True``), with a progress bar, and its md5 is checked against
the MedMNIST table before it is moved into place.
"""

from __future__ import annotations

import hashlib
import zipfile
import os
import re
import urllib.request
from pathlib import Path

import numpy as np

from medistill.classes import same_classes  # noqa: F401  (re-exported)
from medistill.errors import DataError
from medistill.io import atomic_path

ZENODO_RECORD = "https://zenodo.org/records/10519652/files"

# MD5 checksums and split sizes of the 2D files of MedMNIST v3 (the INFO table of the medmnist 3.0.2
# package, which downloads from the same Zenodo record; tests/test_data.py compares both tables with
# that package's when it is installed). Keys are file stems: the 28-px file, then _64/_128/_224.
MD5: dict[str, str] = {
    "pathmnist": "a8b06965200029087d5bd730944a56c1",
    "pathmnist_64": "55aa9c1e0525abe5a6b9d8343a507616",
    "pathmnist_128": "ac42d08fb904d92c244187169d1fd1d9",
    "pathmnist_224": "2c51a510bcdc9cf8ddb2af93af1eadec",
    "chestmnist": "02c8a6516a18b556561a56cbdd36c4a8",
    "chestmnist_64": "9de6cd0b934ebb5b7426cfba5efbae16",
    "chestmnist_128": "db107e5590b27930b62dbaf558aebee3",
    "chestmnist_224": "45bd33e6f06c3e8cdb481c74a89152aa",
    "dermamnist": "0744692d530f8e62ec473284d019b0c7",
    "dermamnist_64": "b70a2f5635c6199aeaa28c31d7202e1f",
    "dermamnist_128": "2defd784463fa5243564e855ed717de1",
    "dermamnist_224": "8974907d8e169bef5f5b96bc506ae45d",
    "octmnist": "c68d92d5b585d8d81f7112f81e2d0842",
    "octmnist_64": "e229e9440236b774d9f0dfef9d07bdaf",
    "octmnist_128": "0a97e76651ace45c5d943ee3f65b63ae",
    "octmnist_224": "abc493b6d529d5de7569faaef2773ba3",
    "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
    "pneumoniamnist_64": "8f4eceb4ccffa70c672198ea285246c6",
    "pneumoniamnist_128": "05b46931834c231683c68f40c47b2971",
    "pneumoniamnist_224": "d6a3c71de1b945ea11211b03746c1fe1",
    "retinamnist": "bd4c0672f1bba3e3a89f0e4e876791e4",
    "retinamnist_64": "afda852cc34dcda56f86ad2b2457dbcc",
    "retinamnist_128": "e48e916a24454daf90583d4e6efb1a18",
    "retinamnist_224": "eae7e3b6f3fcbda4ae613ebdcbe35348",
    "breastmnist": "750601b1f35ba3300ea97c75c52ff8f6",
    "breastmnist_64": "742edef2a1fd1524b2efff4bd7ba9364",
    "breastmnist_128": "363e4b3f8d712e9b5de15470a2aaadf1",
    "breastmnist_224": "b56378a6eefa9fed602bb16d192d4c8b",
    "bloodmnist": "7053d0359d879ad8a5505303e11de1dc",
    "bloodmnist_64": "2b94928a2ae4916078ca51e05b6b800b",
    "bloodmnist_128": "adace1e0ed228fccda1f39692059dd4c",
    "bloodmnist_224": "b718ff6835fcbdb22ba9eacccd7b2601",
    "tissuemnist": "ebe78ee8b05294063de985d821c1c34b",
    "tissuemnist_64": "123ece2eba09d0aa5d698fda57103344",
    "tissuemnist_128": "61b955355d7425a89687b06cca3ce0c2",
    "tissuemnist_224": "b077128c4a949f0a4eb01517f9037b9c",
    "organamnist": "68e3f8846a6bd62f0c9bf841c0d9eacc",
    "organamnist_64": "2dcccc29b88e6da5a01161ef20cda288",
    "organamnist_128": "eeae80d0a227a8d099027e1b3cfd3b60",
    "organamnist_224": "50747347e05c87dd3aaf92c49f9f3170",
    "organcmnist": "b9ceb9546e10131b32923c5bbeaea2b1",
    "organcmnist_64": "3ce34a8724ea6f548e6db4744d03b6a9",
    "organcmnist_128": "773c1f009daa3fe5d9a2a201b2a7ed94",
    "organcmnist_224": "050f5e875dc056f6768abf94ec9995d1",
    "organsmnist": "9ab87b696fb54e2a387ebe992d6ed5f1",
    "organsmnist_64": "53a6d115339d874c25e309a994ff46d3",
    "organsmnist_128": "ded0c5fa01a95dc4978b956f613e9b8e",
    "organsmnist_224": "b354719e553fbbb2513d5533f52a4cb1",
}
# (train, val, test) images of each flavour, the same at every size
SPLIT_COUNTS: dict[str, tuple[int, int, int]] = {
    "pathmnist": (89996, 10004, 7180),
    "chestmnist": (78468, 11219, 22433),
    "dermamnist": (7007, 1003, 2005),
    "octmnist": (97477, 10832, 1000),
    "pneumoniamnist": (4708, 524, 624),
    "retinamnist": (1080, 120, 400),
    "breastmnist": (546, 78, 156),
    "bloodmnist": (11959, 1712, 3421),
    "tissuemnist": (165466, 23640, 47280),
    "organamnist": (34561, 6491, 17778),
    "organcmnist": (12975, 2392, 8216),
    "organsmnist": (13932, 2452, 8827),
}
FLAVOURS = sorted({k.split("_")[0] for k in MD5})
# Datasets whose class ids are ordered grades (QWK is meaningful): RetinaMNIST's DR grades 0–4.
ORDINAL = {"retinamnist"}
MULTI_LABEL = {"chestmnist"}
# Class names of each flavour, by label id (the MedMNIST INFO table; RetinaMNIST's are its grades).
_ORGANS = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen"]
CLASS_NAMES: dict[str, list[str]] = {
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
                  "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
    "chestmnist": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                   "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"],
    "tissuemnist": ["collecting duct, connecting tubule", "distal convoluted tubule", "glomerular endothelial cells",
                    "interstitial endothelial cells", "leukocytes", "podocytes", "proximal tubule segments",
                    "thick ascending limb"],
    "organamnist": _ORGANS, "organcmnist": _ORGANS, "organsmnist": _ORGANS,
}
_NAME_RE = re.compile(r"^([a-z]+mnist)(?:_(28|64|128|224))?$")


def is_medmnist_name(name: str) -> bool:
    m = _NAME_RE.match(name.lower())
    return bool(m) and m.group(1) in FLAVOURS


def is_ordinal(name: str) -> bool:
    """Whether a MedMNIST name or ``.npz`` path (by its file name) is an ordinal grading task."""
    stem = Path(name).stem if name.endswith(".npz") else name
    return stem.lower().split("_")[0] in ORDINAL


def class_names(name: str, n_classes: int) -> list[str]:
    """The class names of a MedMNIST name or ``.npz`` path (by its file name); label ids as
    strings for any other file, or when the file's class count differs from the table's."""
    stem = (Path(name).stem if name.endswith(".npz") else name).lower()
    m = _NAME_RE.match(stem)
    names = CLASS_NAMES.get(m.group(1)) if m else None
    return list(names) if names and len(names) == n_classes else [str(c) for c in range(n_classes)]


def default_cache_dir() -> Path:
    """Where downloaded datasets go: ``datasets/`` of :func:`medistill.io.cache_root`, beside the
    teacher caches, so ``$MEDISTILL_CACHE_DIR`` moves both."""
    from medistill.io import cache_root

    return cache_root() / "datasets"


def search_dirs() -> list[Path]:
    dirs = []
    if env := os.environ.get("MEDISTILL_DATA_DIR"):
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    dirs.append(default_cache_dir())
    return dirs


def file_stem(name: str) -> str:
    m = _NAME_RE.match(name.lower())
    if not m:
        raise DataError(f"{name!r} is not a MedMNIST name (e.g. retinamnist, breastmnist_64)")
    flavour, size = m.group(1), m.group(2)
    return flavour if size in (None, "28") else f"{flavour}_{size}"


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, stem: str) -> str | None:
    """Check ``path`` against the table. Returns the md5, or None when no checksum is known."""
    expected = MD5.get(stem)
    if expected is None:
        return None
    got = md5_file(path)
    if got != expected:
        raise DataError(
            f"{path}: md5 {got} does not match the MedMNIST checksum {expected} for {stem}.npz; "
            f"{_release_hint(path, stem)} (delete it and download it again)"
        )
    return got


def _release_hint(path: Path, stem: str) -> str:
    """Why a file may fail its checksum, from its split sizes against :data:`SPLIT_COUNTS`: an
    older MedMNIST release (other sizes: OrganAMNIST's v2 file held 34,581 training images, v3's
    34,561) or damage (the same sizes, other bytes)."""
    official = SPLIT_COUNTS.get(stem.split("_")[0])
    try:
        with np.load(path, allow_pickle=False) as z:
            found = tuple(len(z[f"{s}_labels"]) for s in ("train", "val", "test"))
    except Exception:  # noqa: BLE001 - an unreadable file says enough by failing its checksum
        return "the file is corrupt or not the official release"
    if official is None or found == official:
        return "the split sizes are the official ones, so the file is damaged or re-saved"
    return (f"it holds {found[0]}/{found[1]}/{found[2]} train/val/test images where the current release (v3) holds "
            f"{official[0]}/{official[1]}/{official[2]}: an older MedMNIST release or another file")


def resolve(name: str, download: bool = False) -> Path:
    """Find (or, when ``download``, fetch) the ``.npz`` of a MedMNIST name or path."""
    p = Path(name).expanduser()
    if p.suffix == ".npz":
        if p.is_file():
            return p
        # a bare file name (``isic8_64.npz``) is looked up in the data directories, like a MedMNIST name
        found = [d / p.name for d in search_dirs() if len(p.parts) == 1 and (d / p.name).is_file()]
        if found:
            return found[0]
        raise DataError(f"dataset file not found: {p}" + (f" (also looked in {', '.join(str(d) for d in search_dirs())})"
                                                          if len(p.parts) == 1 else ""))
    stem = file_stem(name)
    flavour = stem.split("_")[0]
    if flavour in MULTI_LABEL:
        raise DataError(f"{flavour} is multi-label; medistill handles single-label classification only")
    looked = []
    for d in search_dirs():
        cand = d / f"{stem}.npz"
        looked.append(str(cand))
        if cand.is_file():
            verify(cand, stem)
            return cand
    if download:
        return _download(stem, default_cache_dir() / f"{stem}.npz")
    raise DataError(
        f"dataset {name!r} not found. Looked in: {', '.join(looked)}. "
        f"Put {stem}.npz in one of these (or set MEDISTILL_DATA_DIR), download it from "
        f"{ZENODO_RECORD}/{stem}.npz, or pass download=True / --download when online."
    )


def _download(stem: str, dest: Path) -> Path:
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    url = f"{ZENODO_RECORD}/{stem}.npz?download=1"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, atomic_path(dest) as tmp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                          TimeRemainingColumn()) as bar, open(tmp, "wb") as fh:
                task = bar.add_task(f"downloading {stem}.npz", total=total)
                while block := resp.read(1 << 16):
                    fh.write(block)
                    bar.advance(task, len(block))
            verify(tmp, stem)
    except OSError as e:
        raise DataError(f"could not download {url}: {e}. Offline? Place {stem}.npz in {dest.parent}.") from e
    return dest


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Load the six arrays of a MedMNIST file (``allow_pickle=False``: data, never code)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DataError(f"{path}: not readable ({e})") from None
    if magic[:2] != b"PK":   # an .npz is a zip archive of .npy arrays
        kind = "an empty file" if not magic else ("a single .npy array" if magic.startswith(b"\x93NUM") else
                                                  f"not a zip archive (it starts with {magic!r})")
        raise DataError(f"{path}: not a .npz archive: {kind}; save the arrays with numpy.savez(path, train_images=…, "
                        "train_labels=…, …)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e):   # numpy's hint to allow pickles is not one medistill would follow
            raise DataError(f"{path}: not a .npz archive of arrays (numpy sees Python objects or plain text); "
                            "medistill reads arrays only — save images and labels with numpy.savez") from e
        raise DataError(f"{path}: not a readable .npz archive ({e})") from e
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path}: not a readable .npz archive — truncated or another kind of file "
                        f"({type(e).__name__}: {e})") from e
    need = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {missing}; a MedMNIST file holds {need}")
    for s in ("train", "val", "test"):
        lab = arrays[f"{s}_labels"]
        if lab.ndim == 0:
            raise DataError(f"{path}: {s}_labels is a single value ({lab.item()!r}), not one label per image; save an "
                            f"array of {len(arrays[f'{s}_images'])} labels")
        if lab.ndim == 2 and lab.shape[1] > 1:
            raise DataError(f"{path}: {s}_labels has shape {lab.shape} (multi-label); single-label only")
        if len(lab) != len(arrays[f"{s}_images"]):
            raise DataError(f"{path}: {s}_images and {s}_labels differ in length")
    return arrays
