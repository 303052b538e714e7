"""Image classification datasets for the searcher and the retrainer, read from disk in their
published formats (no network needed), plus deterministic augmentation and resumable loaders.

    train = load_split("cifar10", "train", "/data", augment="search")
    first, second = split_indices(len(train))          # DARTS: weights on one half, alphas on the other
    for epoch in range(start_epoch, epochs):
        loader = make_loader(train, first, 64, seed=run_seed, epoch=epoch, start_batch=skip)

Formats: CIFAR-10/100 "python version" pickles, NAS-Bench-201's ImageNet16 pickles (kept to the
first 120 classes), Fashion-MNIST idx files (padded to 32x32, 3 channels by default), and a small
generated set that a tiny CNN learns in seconds. Images stay in memory as uint8 [N, H, W, C];
``ImageSet[i]`` turns one into a normalized float [C, H, W] tensor.

Augmentation draws come from a hash of (seed, epoch, index), never from a global or per-worker RNG,
so a resumed run and an uninterrupted one see the same images whatever ``num_workers`` is.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DATASETS",
    "AUGMENTS",
    "DataError",
    "DatasetInfo",
    "dataset_info",
    "default_data_dir",
    "load_split",
    "ImageSet",
    "split_indices",
    "make_loader",
]

DATASETS = ("cifar10", "cifar100", "imagenet16-120", "fashion-mnist", "synthetic")
SPLITS = ("train", "test")
AUGMENTS = ("none", "search", "train")

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_IMAGENET16_URL = (
    "https://image-net.org/download-images (Downsampled ImageNet 16x16: train_data_batch_1..10 and val_data, "
    "as NAS-Bench-201 uses them)"
)
_FASHION_URL = "https://github.com/zalandoresearch/fashion-mnist"


class DataError(ValueError):
    """A dataset cannot be found or read. The message names the dataset, the path(s) looked at,
    and how to get the data."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple
    std: tuple

    @property
    def crop_padding(self) -> int:
        """Zero padding of the random crop: 4 for 32x32 (DARTS/NB201 CIFAR), 2 for 16x16 (NB201 ImageNet16)."""
        return self.image_size // 8


# Means/stds of the training images, per channel, in [0, 1].
# CIFAR-10/100 and Fashion-MNIST: the commonly used values (as given in this project's brief).
# ImageNet16: NAS-Bench-201's own numbers, (122.68, 116.66, 104.01)/255 and (63.22, 61.26, 65.09)/255,
# from get_dataset_with_transform.py in github.com/D-X-Y/AutoDL-Projects.
# Fashion-MNIST's values are those of the 28x28 images (the zero padding to 32x32 is not counted).
_STATS = {
    "cifar10": (10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (100, 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet16-120": (
        120,
        16,
        3,
        (122.68 / 255, 116.66 / 255, 104.01 / 255),
        (63.22 / 255, 61.26 / 255, 65.09 / 255),
    ),
    "fashion-mnist": (10, 32, 1, (0.2860,), (0.3530,)),
    "synthetic": (10, 32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def _check_name(name) -> str:
    key = str(name).lower()
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return key


def dataset_info(name: str, channels: int | None = None) -> DatasetInfo:
    """Class count, image size, channels and normalization of a dataset. ``channels`` is 1 or 3 for
    fashion-mnist (default 3: the grey image is replicated, so 3-channel stems run unchanged); the
    other datasets are 3-channel only."""
    key = _check_name(name)
    classes, size, native, mean, std = _STATS[key]
    if key == "fashion-mnist":
        c = 3 if channels is None else channels
        if c not in (1, 3):
            raise DataError(f"fashion-mnist: channels must be 1 or 3, got {channels!r}")
        return DatasetInfo(key, classes, size, c, mean * c, std * c)
    if channels not in (None, native):
        raise DataError(f"{key}: channels must be {native} (or None), got {channels!r}; "
                        "only fashion-mnist takes 1 or 3")
    return DatasetInfo(key, classes, size, native, mean, std)


def default_data_dir() -> str:
    """Where datasets are looked for when no directory is given: $TOPONAS_DATA_DIR, else ./data."""
    return os.environ.get("TOPONAS_DATA_DIR", "data")


# ---------------------------------------------------------------------------------------------
# Readers


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The dataset pickles hold dicts of numpy arrays, lists and strings; refuse anything else, so a
    bad file cannot run code while being read."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "_frombuffer", "scalar"}

    def find_class(self, module, name):
        if (module == "numpy" or module.startswith("numpy.")) and name in self._ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles store bytes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_pickle_batch(path: str, dataset: str, label_key: str, size: int, hint: str):
    """One pickled batch -> (uint8 [N, C*size*size] array, int64 [N] labels). Keys may be bytes (as
    pickled by Python 2 and read with latin1) or str."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise DataError(f"{dataset}: cannot read {path} ({_why(e)}); {hint}") from e
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(f"{dataset}: {path} is not a readable pickle ({_why(e)}); {hint}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{dataset}: {path} holds a {type(obj).__name__}, expected a dict with 'data' and "
                        f"'{label_key}'; {hint}")
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or label_key not in obj:
        raise DataError(f"{dataset}: {path} lacks the 'data' or '{label_key}' entry "
                        f"(has {sorted(map(str, obj))}); {hint}")
    try:
        data, labels = np.asarray(obj["data"]), np.asarray(obj[label_key])
    except (ValueError, TypeError) as e:  # ragged lists and the like
        raise DataError(f"{dataset}: {path}: 'data' or '{label_key}' is not an array ({_why(e)}); {hint}") from e
    width = 3 * size * size
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != width:
        raise DataError(f"{dataset}: {path}: 'data' is {data.dtype} {list(data.shape)}, "
                        f"expected uint8 [N, {width}]; {hint}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{dataset}: {path}: '{label_key}' is {labels.dtype} {list(labels.shape)}, expected "
                        f"{data.shape[0]} integers; {hint}")
    return data, labels.astype(np.int64)


def _chw_rows_to_hwc(data: np.ndarray, size: int) -> np.ndarray:
    return np.ascontiguousarray(data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1))


def _why(e: BaseException) -> str:
    """An exception as one line, for a one-line DataError."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _find_dir(candidates: list[str], marker: str) -> str | None:
    for d in candidates:
        if os.path.isfile(os.path.join(d, marker)):
            return d
    return None


def _missing(dataset: str, root: str, sub: str, marker: str, hint: str) -> DataError:
    looked = os.path.join(root, sub, marker) + " and " + os.path.join(root, marker)
    return DataError(f"{dataset}: no {sub} under {root} (looked at {looked}); {hint}")


def _torchvision_download(dataset: str, cls_name: str, root: str, train: bool, hint: str) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise DataError(f"{dataset}: not found in {root}, and downloading it needs torchvision, which is not "
                        f"installed (pip install torchvision, the release that matches your torch); {hint}") from e
    try:
        getattr(tvd, cls_name)(root=root, train=train, download=True)
    except Exception as e:
        raise DataError(f"{dataset}: download into {root} failed ({_why(e)}); {hint}") from e


def _read_cifar(key: str, split: str, data_dir: str | None, download: bool):
    root = os.path.abspath(data_dir or default_data_dir())
    sub, files, label_key, tv = {
        "cifar10": ("cifar-10-batches-py",
                    {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                    "labels", "CIFAR10"),
        "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels", "CIFAR100"),
    }[key]
    hint = (f"download the python version from {_CIFAR_URL} and extract it so that {os.path.join(root, sub)} "
            f"holds {', '.join(files['train'] + files['test'])}, or pass --data-dir")
    candidates = [os.path.join(root, sub), root]
    folder = _find_dir(candidates, files[split][0])
    if folder is None and download:
        _torchvision_download(key, tv, root, split == "train", hint)
        folder = _find_dir(candidates, files[split][0])
    if folder is None:
        raise _missing(key, root, sub, files[split][0], hint)
    parts = [_read_pickle_batch(os.path.join(folder, f), key, label_key, 32, hint) for f in files[split]]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _chw_rows_to_hwc(data, 32), labels


def _read_imagenet16(split: str, data_dir: str | None):
    key = "imagenet16-120"
    root = os.path.abspath(data_dir or default_data_dir())
    files = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    hint = (f"get the 16x16 downsampled ImageNet from {_IMAGENET16_URL} and put the files in "
            f"{os.path.join(root, 'ImageNet16')}, or pass --data-dir")
    folder = _find_dir([os.path.join(root, "ImageNet16"), root], files[0])
    if folder is None:
        raise _missing(key, root, "ImageNet16", files[0], hint)
    parts = [_read_pickle_batch(os.path.join(folder, f), key, "labels", 16, hint) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 1 or labels.max() > 1000):
        raise DataError(f"{key}: labels in {folder} range {labels.min()}..{labels.max()}, expected 1-based ImageNet "
                        f"classes 1..1000; {hint}")
    keep = labels <= 120  # NAS-Bench-201's ImageNet16-120: the first 120 classes
    return _chw_rows_to_hwc(data[keep], 16), labels[keep] - 1


_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: str, ndim: int, hint: str) -> np.ndarray:
    """An idx file (plain or .gz) of unsigned bytes with ``ndim`` dimensions."""
    key = "fashion-mnist"
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except OSError as e:  # includes truncated / corrupt gzip streams
        raise DataError(f"{key}: cannot read {path} ({_why(e)}); {hint}") from e
    except EOFError as e:
        raise DataError(f"{key}: {path} is truncated ({_why(e)}); {hint}") from e
    head = 4 + 4 * ndim
    if len(raw) < head or raw[:4] != bytes((0, 0, 8, ndim)):
        raise DataError(f"{key}: {path} is not an idx file of {ndim}-d unsigned bytes "
                        f"(header {raw[:4].hex() or 'empty'}, expected 000008{ndim:02x}); {hint}")
    shape = tuple(int(x) for x in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) != head + int(np.prod(shape)):
        raise DataError(f"{key}: {path} has {len(raw) - head} data bytes, its header {list(shape)} says "
                        f"{int(np.prod(shape))}; the file is truncated or corrupt; {hint}")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(shape)


def _idx_file(folder: str, name: str) -> str | None:
    for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(p):
            return p
    return None


def _read_fashion(split: str, data_dir: str | None, download: bool, channels: int):
    key = "fashion-mnist"
    img_name, lab_name = _IDX[split]
    if data_dir is not None:
        root = os.path.abspath(data_dir)
        candidates = [root, os.path.join(root, "FashionMNIST", "raw")]
    else:
        root = os.path.abspath(default_data_dir())
        candidates = [DEBIAN_FASHION_MNIST, os.path.join(root, "FashionMNIST", "raw")]
    hint = (f"install Debian's dataset-fashion-mnist package (files in {DEBIAN_FASHION_MNIST}), or put the four idx "
            f"files from {_FASHION_URL} in --data-dir, or pass download=True")
    folder = _find_dir(candidates, img_name) or _find_dir(candidates, img_name + ".gz")
    if folder is None and download:
        _torchvision_download(key, "FashionMNIST", root, split == "train", hint)
        folder = _find_dir(candidates, img_name) or _find_dir(candidates, img_name + ".gz")
    if folder is None:
        looked = " and ".join(os.path.join(c, img_name) + "[.gz]" for c in candidates)
        raise DataError(f"{key}: no {img_name} found (looked at {looked}); {hint}")
    lab_path = _idx_file(folder, lab_name)
    if lab_path is None:
        raise DataError(f"{key}: {folder} has {img_name} but no {lab_name}[.gz]; {hint}")
    images = _read_idx(_idx_file(folder, img_name), 3, hint)
    labels = _read_idx(lab_path, 1, hint)
    if images.shape[1:] != (28, 28) or labels.shape[0] != images.shape[0]:
        raise DataError(f"{key}: {folder}: images {list(images.shape)} and labels {list(labels.shape)}, expected "
                        f"[N, 28, 28] and [N]; {hint}")
    out = np.zeros((images.shape[0], 32, 32, channels), np.uint8)
    out[:, 2:30, 2:30, :] = images[..., None]
    return out, labels.astype(np.int64)


# Ten well-separated hues (HSV with full saturation and value) for the synthetic classes.
_HUES = np.array([[255, 0, 0], [255, 153, 0], [204, 255, 0], [51, 255, 0], [0, 255, 102],
                  [0, 255, 255], [0, 102, 255], [51, 0, 255], [204, 0, 255], [255, 0, 153]], np.float32)


def _make_synthetic(n: int, seed: int, split: str):
    """``n`` 32x32 RGB images: grey noise with one square (side 10..14) at a random position whose
    colour is the class's hue, brightness-jittered. Balanced classes, deterministic from (seed, split)."""
    if not isinstance(n, int) or n < 1:
        raise DataError(f"synthetic: synthetic_size must be a positive int, got {n!r}")
    rng = np.random.default_rng([SPLITS.index(split), seed % 2**63])
    labels = rng.permutation(np.arange(n) % 10)
    side = rng.integers(10, 15, n)
    y0 = rng.integers(0, 33 - side)
    x0 = rng.integers(0, 33 - side)
    grid = np.arange(32)
    rows = (grid >= y0[:, None]) & (grid < (y0 + side)[:, None])
    cols = (grid >= x0[:, None]) & (grid < (x0 + side)[:, None])
    square = rows[:, :, None] & cols[:, None, :]
    colour = _HUES[labels] * rng.uniform(0.6, 1.0, (n, 1)).astype(np.float32)
    img = rng.normal(128, 40, (n, 32, 32, 3)).astype(np.float32)
    img = np.where(square[..., None], colour[:, None, None, :] + rng.normal(0, 20, (n, 32, 32, 3)), img)
    return np.clip(img, 0, 255).round().astype(np.uint8), labels.astype(np.int64)


def load_split(name: str, split: str = "train", data_dir: str | None = None, *, channels: int | None = None,
               download: bool = False, synthetic_size: int = 512, seed: int = 0, augment: str = "none",
               cutout: int = 0) -> "ImageSet":
    """Read one split of a dataset into memory.

    ``data_dir``: the folder holding the dataset's files (or its parent); None means
    $TOPONAS_DATA_DIR or ./data, and for fashion-mnist first Debian's /usr/share/datasets/fashion-mnist.
    ``download``: fetch missing CIFAR / Fashion-MNIST files with torchvision's downloader.
    ``seed``: the synthetic set's generator, and the augmentation stream (see ImageSet).
    Raises DataError (one line: dataset, paths looked at, how to get the data) on any problem."""
    key = _check_name(name)
    if split not in SPLITS:
        raise DataError(f"{key}: split must be 'train' or 'test', got {split!r}")
    info = dataset_info(key, channels)
    if key in ("cifar10", "cifar100"):
        images, labels = _read_cifar(key, split, data_dir, download)
    elif key == "imagenet16-120":
        images, labels = _read_imagenet16(split, data_dir)
    elif key == "fashion-mnist":
        images, labels = _read_fashion(split, data_dir, download, info.channels)
    else:
        images, labels = _make_synthetic(synthetic_size, seed, split)
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(f"{key}: labels of the {split} split range {labels.min()}..{labels.max()}, expected "
                        f"0..{info.num_classes - 1}")
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), info,
                    augment=augment, cutout=cutout, seed=seed)


# ---------------------------------------------------------------------------------------------
# Dataset with deterministic augmentation

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _hash(*values: int) -> int:
    """A well-mixed 64-bit number from a few integers (negative ones too)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _M64))
    return h


class ImageSet(Dataset):
    """uint8 images [N, H, W, C] and int64 labels [N] in memory, with the dataset's info.

    ``self[i]`` -> (float32 [C, H, W] normalized with info.mean/std, int label). ``augment``:
    "none"; "search": random crop with zero padding (info.crop_padding: 4 at 32x32, 2 at 16x16)
    and horizontal flip, as the DARTS/NB201 pipelines; "train": the same, then cutout of side
    ``cutout`` (zeroed after normalization, as DARTS does). The draws for image i come from
    hash(seed, epoch, i), with the epoch set by set_epoch() (make_loader does it)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, *,
                 augment: str = "none", cutout: int = 0, seed: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (
                info.image_size, info.image_size, info.channels):
            raise ValueError(f"images must be uint8 [N, {info.image_size}, {info.image_size}, {info.channels}], "
                             f"got {images.dtype} {list(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be int64 [{images.shape[0]}], got {labels.dtype} {list(labels.shape)}")
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        if augment == "train" and not (isinstance(cutout, int) and 0 < cutout <= info.image_size):
            raise ValueError(f"augment='train' needs cutout in 1..{info.image_size} (DARTS retrains with 16), "
                             f"got {cutout!r}")
        if augment != "train" and cutout:
            raise ValueError(f"cutout={cutout!r} is only used with augment='train', got augment={augment!r}")
        self.images, self.labels, self.info = images, labels, info
        self.augment, self.cutout, self.seed = augment, cutout, seed
        self.epoch = 0
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def with_augment(self, augment: str, cutout: int = 0, seed: int | None = None) -> "ImageSet":
        """The same images (shared, not copied) under another augmentation."""
        return ImageSet(self.images, self.labels, self.info, augment=augment, cutout=cutout,
                        seed=self.seed if seed is None else seed)

    def __getitem__(self, index: int):
        return self.get(index, self.epoch)

    def get(self, index: int, epoch: int):
        """Image ``index`` as augmented at ``epoch``; the same (seed, epoch, index) gives the same tensor."""
        x = self.images[index].permute(2, 0, 1).float().div_(255)
        if self.augment != "none":
            bits = _hash(self.seed, epoch, index)
            p, s = self.info.crop_padding, self.info.image_size
            dy, dx = bits % (2 * p + 1), (bits >> 8) % (2 * p + 1)
            x = F.pad(x, (p, p, p, p))[:, dy:dy + s, dx:dx + s]
            if (bits >> 16) & 1:
                x = x.flip(2)
        x = x.sub_(self._mean).div_(self._std).contiguous()  # x is a fresh tensor here: in place is safe
        if self.augment == "train":
            cy, cx, h = (bits >> 24) % s, (bits >> 40) % s, self.cutout // 2
            x[:, max(cy - h, 0):cy + h, max(cx - h, 0):cx + h] = 0
        return x, int(self.labels[index])


class _AtEpoch(Dataset):
    """An ImageSet seen at a fixed epoch: loaders of different epochs never share mutable state."""

    def __init__(self, base: ImageSet, epoch: int):
        self.base, self.epoch = base, epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        return self.base.get(index, self.epoch)


def split_indices(n: int, portion: float = 0.5) -> tuple[list[int], list[int]]:
    """(first floor(n * portion) indices, the rest), as DARTS splits its training set."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not 0.0 < portion <= 1.0:
        raise ValueError(f"portion must be in (0, 1], got {portion!r}")
    k = int(np.floor(n * portion))
    return list(range(k)), list(range(k, n))


def make_loader(dataset, indices, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                start_batch: int = 0, num_workers: int = 0, pin_memory: bool = False,
                drop_last: bool = False, shard: tuple[int, int] = (0, 1)) -> DataLoader:
    """A DataLoader over ``indices`` of ``dataset`` for one epoch.

    The order is a permutation seeded by (seed, epoch) only (or ``indices`` as given when
    shuffle=False); the first ``start_batch`` batches are skipped without being loaded, so the
    rest equals the tail of the full epoch. An ImageSet is read at ``epoch`` (and its epoch is set).
    Workers get torch/numpy/random seeds from the loader's own generator, seeded by (seed, epoch),
    so the global RNG is neither read nor advanced."""
    rank, world = shard
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
    indices = [int(i) for i in indices]
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(dataset)
    if indices and (min(indices) < 0 or max(indices) >= n):
        raise ValueError(f"indices must lie in 0..{n - 1} (len(dataset)), got {min(indices)}..{max(indices)}")
    num_batches = len(indices) // batch_size if drop_last else -(-len(indices) // batch_size)
    if not isinstance(start_batch, int) or not 0 <= start_batch <= num_batches:
        raise ValueError(f"start_batch must be in 0..{num_batches} (batches in this epoch), got {start_batch!r}")
    if shuffle:
        g = torch.Generator().manual_seed(_hash(seed, epoch) >> 1)
        indices = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
    if world > 1:  # data parallel: every rank permutes alike, then takes its share
        indices = indices[rank::world]
        num_batches = len(indices) // batch_size if drop_last else -(-len(indices) // batch_size)
        if start_batch > num_batches:
            raise ValueError(f"start_batch must be in 0..{num_batches} (batches in this shard), got {start_batch!r}")
    order = indices[start_batch * batch_size:]
    if isinstance(dataset, ImageSet):
        dataset.set_epoch(epoch)
        dataset = _AtEpoch(dataset, epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(_hash(seed, epoch, 1) >> 1))
