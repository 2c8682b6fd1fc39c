"""Datasets by name, each with its preprocessing contract, and the transforms built from it.

``load_splits(name, ...)`` returns train / val / test datasets of ``(image, label)`` where images are
float tensors normalised as the dataset's contract says. The same contract is saved in every checkpoint
and used by export and serving, so no other module repeats these numbers.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from training import images
from training.contract import Contract

DEFAULT_DATA_ROOT = Path("data")

# Published statistics of each dataset's training split, pixels scaled to [0, 1].
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DIGIT_NAMES = tuple(str(i) for i in range(10))
FASHION_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataNotFoundError(RuntimeError):
    """The dataset's files are not on disk and could not be downloaded."""


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    contract: Contract


# --------------------------------------------------------------------------------------------------
# Transforms: one place builds them from the contract, for training and evaluation alike.
# --------------------------------------------------------------------------------------------------
def augmentation(policy: str, contract: Contract) -> list[Callable]:
    """Training-only augmentation ops for a named policy. They run on PIL images: the whole digits
    pipeline with RandomAffine took 0.08 ms per image that way against 0.16 ms on uint8 tensors
    (1 thread, median of 7 x 500 images)."""
    h, w = contract.height, contract.width
    if policy == "none":
        return []
    if policy == "crop-flip":  # CIFAR-10 standard: 4 px reflect-pad random crop + horizontal flip
        return [v2.RandomCrop((h, w), padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()]
    if policy == "flip":  # mirror-symmetric classes (clothing) in short schedules: no crop
        return [v2.RandomHorizontalFlip()]
    if policy == "affine":  # handwriting: small rotation, shift and scale; never flip a digit
        return [v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))]
    if policy == "resized-crop":  # photos (ImageFolder / transfer learning)
        return [v2.RandomResizedCrop((h, w), scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    raise ValueError(f"unknown augmentation policy {policy!r}; choose one of {AUGMENTATIONS}")


AUGMENTATIONS = ("none", "flip", "crop-flip", "affine", "resized-crop")


def to_contract(contract: Contract) -> list[Callable]:
    """Ops that turn any PIL image into one in the contract's mode and size: ``training.images``, the
    conversion serving applies to every request too."""
    return [functools.partial(images.to_contract, contract=contract)]


def normalize_float(contract: Contract) -> list[Callable]:
    """PIL -> uint8 (C, H, W) -> float normalised with the contract's mean/std (the same map as
    ``contract.Normalize``, which exported graphs apply to uint8 input)."""
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(contract.mean, contract.std)]


def build_transform(contract: Contract, augment: str = "none") -> v2.Compose:
    """The one input pipeline: contract mode and size, optional augmentation, normalisation."""
    return v2.Compose([*to_contract(contract), *augmentation(augment, contract), *normalize_float(contract)])


# --------------------------------------------------------------------------------------------------
# Dataset definitions
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    name: str
    default_augment: str
    # load(...) -> (make_train, make_test, contract); each make_* takes a transform (or None: raw images)
    load: Callable[..., tuple[Callable[[Callable | None], Dataset], Callable[[Callable | None], Dataset], Contract]]
    description: str


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/val index split (the same split on every run with the same seed)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * val_fraction)
    return perm[n_val:], perm[:n_val]


def load_splits(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    augment: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    image_size: int | None = None,
) -> Splits:
    """Load a dataset by name.

    Args:
        name: one of ``DATASETS``.
        data_dir: where the files are; None means ``data/`` with download when a network is there.
        augment: training augmentation policy; None means the dataset's default. Never applied to
            val/test.
        val_fraction: share of the training split held out to pick the best epoch; the official test
            split stays untouched for final numbers.
        seed: seeds the train/val split.
        download: allow torchvision to download missing files (only when data_dir is None).
        image_size: override the contract's size (ImageFolder / transfer learning).
    Returns:
        Splits with train/val/test datasets and the contract.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    make_train, make_test, contract = spec.load(data_dir=data_dir, download=download, image_size=image_size)
    policy = spec.default_augment if augment is None else augment
    train_full = make_train(build_transform(contract, policy))
    train_eval = make_train(build_transform(contract))  # same images, no augmentation, for val
    test = make_test(build_transform(contract))
    train_idx, val_idx = _split_indices(len(train_full), val_fraction, seed)
    return Splits(Subset(train_full, train_idx), Subset(train_eval, val_idx), test, contract)


# ---- torchvision IDX datasets (MNIST, Fashion-MNIST) ------------------------------------------------
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _atomic_copy(src: Path, dst: Path, decompress: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name + ".")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") if decompress else open(src, "rb") as f:
            shutil.copyfileobj(f, out)
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise


def _stage_idx(cls: type, data_dir: Path, root: Path) -> Path:
    """Return a torchvision root for ``cls`` holding the IDX files found in ``data_dir``.

    Accepts torchvision's own layout (``<data_dir>/<Class>/raw/``) or the four files (``.gz`` or not)
    directly in ``data_dir``, as Debian's dataset packages ship them; the latter are decompressed once
    into ``<root>/staged/<hash of data_dir>/<Class>/raw/``, one folder per source folder, and again
    whenever a source file's mtime differs from its staged copy's (a staged copy of another folder,
    or of older files, is never read).
    """
    if all((data_dir / cls.__name__ / "raw" / f).exists() for f in IDX_FILES):
        return data_dir
    staged = root / "staged" / hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    raw = staged / cls.__name__ / "raw"
    for f in IDX_FILES:
        for candidate, gz in (
            (data_dir / f, False),
            (data_dir / (f + ".gz"), True),
            (data_dir / cls.__name__ / "raw" / (f + ".gz"), True),
        ):
            if candidate.exists():
                mtime = candidate.stat().st_mtime_ns
                if not (raw / f).exists() or (raw / f).stat().st_mtime_ns != mtime:
                    _atomic_copy(candidate, raw / f, decompress=gz)
                    os.utime(raw / f, ns=(mtime, mtime))
                break
        else:
            raise DataNotFoundError(
                f"{cls.__name__} files not found: expected {', '.join(IDX_FILES)} (or .gz) in "
                f"{data_dir} or {data_dir / cls.__name__ / 'raw'}; fetch them or pass --data-dir DIR"
            )
    return staged


def _torchvision_loader(cls: type, contract: Contract):
    def load(data_dir=None, download=True, image_size=None):
        del image_size  # fixed by the dataset
        if data_dir is not None:
            root = _stage_idx(cls, Path(data_dir), DEFAULT_DATA_ROOT) if _is_idx(cls) else Path(data_dir)
            download = False
        else:
            root = DEFAULT_DATA_ROOT
        _open(cls, root, download)  # fail early, once, with a clear message
        return (
            lambda t: _open(cls, root, False, train=True, transform=t),
            lambda t: _open(cls, root, False, train=False, transform=t),
            contract,
        )

    return load


def _is_idx(cls: type) -> bool:
    return issubclass(cls, datasets.MNIST)


def _open(cls: type, root: Path, download: bool, train: bool = True, transform=None) -> Dataset:
    try:
        return cls(root=str(root), train=train, download=download, transform=transform)
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found"; urllib: no network
        expected = (
            ", ".join(f"{root}/{cls.__name__}/raw/{f}" for f in IDX_FILES)
            if _is_idx(cls)
            else f"{root}/cifar-10-batches-py/{{data_batch_1..5,test_batch,batches.meta}}"
        )
        hint = "download failed (no network?)" if download else "not found or corrupted"
        raise DataNotFoundError(
            f"{cls.__name__}: {hint}; expected {expected}. Run once with a network, or pass "
            f"--data-dir DIR (DATA_DIR=DIR for make) pointing at pre-fetched files. ({e})"
        ) from None


class CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader, checking that the batch files exist rather than their md5 on
    every load. The md5 of the archive is still checked by torchvision when it downloads; skipping it
    here lets re-packed or test-sized batches in the same pickle format load."""

    def _check_integrity(self) -> bool:
        base = Path(self.root) / self.base_folder
        return (
            all((base / name).is_file() for name, _ in (*self.train_list, *self.test_list))
            and (base / self.meta["filename"]).is_file()
        )

    def _load_meta(self) -> None:
        import pickle

        path = Path(self.root) / self.base_folder / self.meta["filename"]
        if not path.is_file():
            raise RuntimeError(f"CIFAR-10 metadata file {path} not found")
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


# ---- embedded digits (scikit-learn, offline) ----------------------------------------------------
class DigitsDataset(Dataset):
    """scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to MNIST's 28x28 format.

    Like MNIST, each digit is scaled to a 20x20 box and centred on a 28x28 black canvas, so a model
    trained here sees the same kind of input as one trained on MNIST.
    """

    def __init__(self, train: bool, transform: Callable | None = None) -> None:
        images, labels = _digits_arrays(train)
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode="L")
        return (self.transform(img) if self.transform else img), int(self.labels[i])


_DIGITS_CACHE: dict[bool, tuple[np.ndarray, np.ndarray]] = {}


def _digits_arrays(train: bool) -> tuple[np.ndarray, np.ndarray]:
    if train not in _DIGITS_CACHE:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        # 8x8 values 0..16 -> uint8 0..255 -> 20x20 -> centred in 28x28, as MNIST was built.
        small = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
        big = np.zeros((len(small), 28, 28), dtype=np.uint8)
        for k, im in enumerate(small):
            big[k, 4:24, 4:24] = np.asarray(Image.fromarray(im, "L").resize((20, 20), Image.Resampling.BICUBIC))
        # A fixed, stratified 80/20 split: the "held-out split" every digits number refers to.
        x_tr, x_te, y_tr, y_te = train_test_split(
            big, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0
        )
        _DIGITS_CACHE[True], _DIGITS_CACHE[False] = (x_tr, y_tr), (x_te, y_te)
    return _DIGITS_CACHE[train]


def _load_digits(data_dir=None, download=True, image_size=None):
    del data_dir, download, image_size  # embedded in scikit-learn
    x, _ = _digits_arrays(True)
    pixels = x.astype(np.float64) / 255.0
    contract = Contract(28, 28, 1, (round(float(pixels.mean()), 4),), (round(float(pixels.std()), 4),), DIGIT_NAMES)
    return (lambda t: DigitsDataset(True, t), lambda t: DigitsDataset(False, t), contract)


# ---- ImageFolder trees -------------------------------------------------------------------------
def _load_imagefolder(data_dir=None, download=True, image_size=None):
    del download
    if data_dir is None:
        raise DataNotFoundError(
            "imagefolder needs --data-dir DIR: a tree DIR/<class>/<image> or "
            "DIR/train/<class>/... with DIR/val/<class>/..."
        )
    root = Path(data_dir)
    if not root.is_dir():
        raise DataNotFoundError(f"imagefolder: {root} is not a directory; pass --data-dir DIR")
    train_root, test_root = (root / "train", root / "val") if (root / "train").is_dir() else (root, None)
    try:
        probe = datasets.ImageFolder(str(train_root), is_valid_file=images.is_image_file)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataNotFoundError(f"imagefolder: no class folders with images under {train_root} ({e})") from e
    size = image_size or 224
    contract = Contract(size, size, 3, IMAGENET_MEAN, IMAGENET_STD, tuple(probe.classes))
    # Files are read as serving reads a request (EXIF orientation, 16-bit and alpha handling, JPEG
    # draft decoding), not with torchvision's loader, which drops alpha and ignores EXIF.
    files = {"loader": functools.partial(images.read_file, contract=contract), "is_valid_file": images.is_image_file}
    if test_root is None:
        # No val/ folder: hold out a fixed 20 % of each class as the test split.
        targets = np.asarray(probe.targets)
        rng = np.random.default_rng(0)
        test_idx = sorted(
            i
            for c in np.unique(targets)
            for i in rng.permutation(np.flatnonzero(targets == c))[: max(1, int(0.2 * (targets == c).sum()))]
        )
        train_idx = sorted(set(range(len(targets))) - set(test_idx))
        return (
            lambda t: Subset(datasets.ImageFolder(str(train_root), transform=t, **files), train_idx),
            lambda t: Subset(datasets.ImageFolder(str(train_root), transform=t, **files), test_idx),
            contract,
        )
    test_probe = datasets.ImageFolder(str(test_root), is_valid_file=images.is_image_file)
    if test_probe.classes != probe.classes:
        raise DataNotFoundError(
            f"imagefolder: classes differ between {train_root} {probe.classes} and "
            f"{test_root} {test_probe.classes}; give both the same class folders"
        )
    return (
        lambda t: datasets.ImageFolder(str(train_root), transform=t, **files),
        lambda t: datasets.ImageFolder(str(test_root), transform=t, **files),
        contract,
    )


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        "digits", "affine", _load_digits, "scikit-learn's 1,797 handwritten digits at 28x28 (offline)"
    ),
    "mnist": DatasetSpec(
        "mnist",
        "affine",
        _torchvision_loader(datasets.MNIST, Contract(28, 28, 1, MNIST_MEAN, MNIST_STD, DIGIT_NAMES)),
        "MNIST",
    ),
    # flip, not crop-flip: in a few-epoch budget the crops cost more than they teach (bn_cnn width 16,
    # 8 epochs: 0.918 test accuracy with flip, 0.896 with crop-flip; docs/benchmarks.md, sweep).
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        "flip",
        _torchvision_loader(datasets.FashionMNIST, Contract(28, 28, 1, FASHION_MEAN, FASHION_STD, FASHION_NAMES)),
        "Fashion-MNIST",
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        "crop-flip",
        _torchvision_loader(CIFAR10, Contract(32, 32, 3, CIFAR10_MEAN, CIFAR10_STD, CIFAR10_NAMES)),
        "CIFAR-10",
    ),
    "imagefolder": DatasetSpec(
        "imagefolder", "resized-crop", _load_imagefolder, "a class-per-folder tree (--data-dir)"
    ),
}
