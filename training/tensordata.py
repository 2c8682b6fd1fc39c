"""Tensor-resident datasets: every image as uint8 on the training device, batches cut, augmented and
normalised there.

A DataLoader with workers decodes, augments and normalises one PIL image at a time; on 2 CPU cores
those workers take cores from the model, and on a GPU they cannot keep up with it. A dataset that fits
in memory is instead held as one (N, C, H, W) uint8 tensor (CIFAR-10's 50,000 images: 154 MB, 4x less
than float32) on the device; ``TensorBatches`` draws a shuffled batch by indexing it, augments the
whole batch with tensor ops (``training.augment``) and applies the contract's normalisation
(``training.contract.Normalize``, the map exported graphs start with).

The splits are the ones ``training.data.load_splits`` makes (same train/val indices, same test set),
at the same contract size. ImageFolder trees are decoded once to the contract size and cached on
disk, keyed by every source file's path, size and mtime: a changed, added or removed file rebuilds the
cache, and a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.augment import augment_batch
from training.contract import Contract, Normalize
from training.data import DATASETS, DEFAULT_DATA_ROOT, _split_indices, to_contract
from training.files import atomic_write_bytes
from training.images import is_image_file

CACHE_FORMAT = 2  # bump when the decoded pixels would differ (2: training.images' conversion)


@dataclass(frozen=True)
class TensorSet:
    """Images (N, C, H, W) uint8 and labels (N,) int64, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> TensorSet:
        return TensorSet(self.images.to(device), self.labels.to(device))

    def subset(self, index) -> TensorSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return TensorSet(self.images[index], self.labels[index])

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()


@dataclass(frozen=True)
class TensorSplits:
    train: TensorSet
    val: TensorSet
    test: TensorSet
    contract: Contract


def load_tensor_splits(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_bytes: int | None = None,
) -> TensorSplits | None:
    """``load_splits``' train/val/test as uint8 tensors on the CPU (``TensorSet.to`` moves them).

    Args are those of ``training.data.load_splits``, and:
        cache_dir: where decoded ImageFolder trees are kept (default ``data/cache``).
        max_bytes: return None, before decoding anything, when the images would take more.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    make_train, make_test, contract = DATASETS[name].load(data_dir=data_dir, download=download, image_size=image_size)
    train_ds, test_ds = make_train(None), make_test(None)
    nbytes = (len(train_ds) + len(test_ds)) * int(np.prod(contract.input_shape))
    if max_bytes is not None and nbytes > max_bytes:
        return None
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_DATA_ROOT / "cache"
    full = dataset_tensors(train_ds, contract, cache)
    test = dataset_tensors(test_ds, contract, cache)
    train_idx, val_idx = _split_indices(len(full), val_fraction, seed)
    return TensorSplits(full.subset(train_idx), full.subset(val_idx), test, contract)


def dataset_tensors(ds: Dataset, contract: Contract, cache_dir: Path) -> TensorSet:
    """The pixels of a dataset (made without a transform) at the contract size, as uint8 tensors.

    Datasets that hold their pixels in memory (MNIST/Fashion-MNIST ``.data``, CIFAR-10 ``.data``, the
    embedded digits) are read directly; file trees (ImageFolder, or a Subset of one) are decoded
    through ``to_contract`` once and cached.
    """
    from torch.utils.data import Subset
    from torchvision import datasets

    if isinstance(ds, Subset):
        return dataset_tensors(ds.dataset, contract, cache_dir).subset(list(ds.indices))
    if isinstance(ds, datasets.MNIST):  # (N, 28, 28) uint8 tensor
        return _checked(
            TensorSet(ds.data.unsqueeze(1).contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)), contract
        )
    if isinstance(ds, datasets.CIFAR10):  # (N, 32, 32, 3) uint8 numpy
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return _checked(TensorSet(images, torch.as_tensor(ds.targets, dtype=torch.long)), contract)
    if hasattr(ds, "images") and hasattr(ds, "labels"):  # DigitsDataset: (N, 28, 28) uint8 numpy
        return _checked(
            TensorSet(
                torch.from_numpy(np.ascontiguousarray(ds.images))[:, None], torch.as_tensor(ds.labels, dtype=torch.long)
            ),
            contract,
        )
    if isinstance(ds, datasets.ImageFolder):
        return cached_imagefolder(ds, contract, cache_dir)
    raise TypeError(f"no tensor form for {type(ds).__name__}; train it with --pipeline loader")


def _checked(data: TensorSet, contract: Contract) -> TensorSet:
    if tuple(data.images.shape[1:]) != contract.input_shape:
        raise ValueError(
            f"dataset images are {tuple(data.images.shape[1:])}, the contract says "
            f"{contract.input_shape}; train with --pipeline loader to resize them"
        )
    return data


# ---- ImageFolder: decode once, cache keyed by the source files ---------------------------------------
def source_key(samples: list[tuple[str, int]], contract: Contract) -> str:
    """sha256 of every file's path, class, size and mtime (ns) and of the decoded size: any change to
    the tree or the contract gives a different key."""
    h = hashlib.sha256(f"v{CACHE_FORMAT} {contract.channels}x{contract.height}x{contract.width}\n".encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(root: str, contract: Contract, cache_dir: Path) -> Path:
    """One cache file per (tree, contract size); the key inside says whether it is current."""
    tree = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"imagefolder-{tree}-{contract.channels}x{contract.height}x{contract.width}.pt"


def cached_imagefolder(ds, contract: Contract, cache_dir: Path, workers: int | None = None) -> TensorSet:
    """An ImageFolder's images at the contract size, from the cache when its key matches the files
    on disk now, else decoded (DataLoader workers, the PIL path's ``to_contract``) and cached."""
    key = source_key(ds.samples, contract)
    path = cache_path(ds.root, contract, cache_dir)
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError):  # torn or foreign file: rebuild it
            cached = None
        if isinstance(cached, dict) and cached.get("key") == key:
            return TensorSet(cached["images"], cached["labels"])
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    decode = v2.Compose([*to_contract(contract), v2.PILToTensor()])
    # The same file list (ImageFolder sorts it) read by the same loader as the dataset's: the image
    # conversion serving uses too (training.images: EXIF, alpha, 16-bit, JPEG draft)
    fresh = ImageFolder(ds.root, transform=decode, loader=ds.loader, is_valid_file=is_image_file)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    images, labels = [], []
    for x, y in DataLoader(fresh, batch_size=64, num_workers=workers):
        images.append(x)
        labels.append(y)
    data = TensorSet(torch.cat(images), torch.cat(labels).long())
    # Files changed while decoding would leave pixels under the wrong key: key them as found at the end.
    if source_key(fresh.samples, contract) == key:
        atomic_write_bytes(path, lambda f: torch.save({"key": key, "images": data.images, "labels": data.labels}, f))
    return data


# ---- batches -----------------------------------------------------------------------------------------
def seed_for(*parts: int) -> int:
    """A 63-bit seed from (seed, epoch, rank, stream): independent streams that a resume recreates."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def shard_indices(
    n: int,
    *,
    epoch: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    repeats: int = 1,
    shuffle: bool = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """This rank's sample order for one epoch: ``repeats`` shuffled passes over ``n`` samples, the
    same on every rank (seeded by ``seed`` and ``epoch``), dealt round-robin so that ranks get
    disjoint, equally long shares (the tail that does not divide by ``world`` is dropped)."""
    if shuffle:
        g = torch.Generator(device=device).manual_seed(seed_for(seed, epoch, 0))
        order = torch.cat([torch.randperm(n, generator=g, device=device) for _ in range(repeats)])
    else:
        order = torch.arange(n, device=device).repeat(repeats)
    per_rank = len(order) // world
    return order[rank : per_rank * world : world]


class TensorBatches:
    """Batches ``(images, labels)`` of a TensorSet: images float32 (N, C, H, W), augmented and
    normalised on the set's device, labels int64. Iterate once per epoch after ``set_epoch``.

    Args:
        data: the split, already on the training device.
        contract: its normalisation.
        batch_size: per process.
        augment: a policy of ``training.augment`` (training only).
        shuffle, drop_last: as DataLoader's.
        seed, rank, world: the order is seeded by (seed, epoch), the same on every rank, and split
            between ranks; augmentation draws from a stream seeded by (seed, epoch, rank).
        repeats: passes over the data per epoch (``min_steps`` on small datasets).
    """

    def __init__(
        self,
        data: TensorSet,
        contract: Contract,
        batch_size: int,
        *,
        augment: str = "none",
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        repeats: int = 1,
    ) -> None:
        self.data, self.batch_size, self.augment = data, batch_size, augment
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world, self.repeats = rank, world, repeats
        self.normalize = Normalize(contract).to(data.images.device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _samples(self) -> int:
        return len(self.data) * self.repeats // self.world

    def __len__(self) -> int:
        n, b = self._samples(), self.batch_size
        return n // b if self.drop_last and n >= b else -(-n // b)

    def indices(self) -> torch.Tensor:
        """The samples this rank's batches of this epoch hold, in order."""
        order = shard_indices(
            len(self.data),
            epoch=self.epoch,
            seed=self.seed,
            rank=self.rank,
            world=self.world,
            repeats=self.repeats,
            shuffle=self.shuffle,
            device=self.data.images.device,
        )
        return order[: len(self) * self.batch_size]

    def __iter__(self):
        dev = self.data.images.device
        order = self.indices()
        g = torch.Generator(device=dev).manual_seed(seed_for(self.seed, self.epoch, self.rank, 1))
        for k in range(len(self)):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            x = self.data.images[idx].to(torch.float32)  # (B, C, H, W) 0..255
            x = augment_batch(self.augment, x, g)
            yield self.normalize(x), self.data.labels[idx]

    def sample_grid(self, n: int = 32) -> torch.Tensor:
        """The first ``n`` training images as the model sees them, un-normalised to 0..1 (for
        TensorBoard)."""
        g = torch.Generator(device=self.data.images.device).manual_seed(self.seed)
        x = augment_batch(self.augment, self.data.images[:n].to(torch.float32), g)
        return (x / 255.0).clamp(0, 1).cpu()


def memory_budget(device: torch.device, share: float = 0.25) -> int:
    """Bytes of images a dataset may take on ``device``: ``share`` of what is free there now (the
    model, activations and other processes need the rest)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(share * free)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        free = info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError, IndexError):
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(share * free)
