"""The images export works on, as the exported graphs take them: uint8 NCHW pixels.

Held-out pixels (the test split of the checkpoint's dataset) feed the parity and accuracy gates;
calibration pixels (the training split, never augmented) feed INT8 calibration. Both come from
``training.data.load_splits``, so the dataset code and its contract exist once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from training.contract import Contract
from training.data import load_splits


@dataclass(frozen=True)
class Pixels:
    """A labelled uint8 image set: ``images`` (N, C, H, W) uint8, ``labels`` (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_pixels(
    dataset: str,
    data_dir: str | None,
    contract: Contract,
    split: str,
    limit: int = 0,
    seed: int = 0,
    image_size: int | None = None,
    val_fraction: float = 0.0,
    split_seed: int = 0,
) -> Pixels:
    """uint8 pixels and labels of a dataset split, at the contract's size.

    Args:
        dataset: dataset name the checkpoint was trained on.
        data_dir: where its files are (None: the dataset's default).
        contract: the checkpoint's contract; the dataset must give the same one.
        split: "test" (held-out), "train" (INT8 calibration; no augmentation) or "val" (the share of
            the training split training held out: temperature fitting).
        limit: keep a seeded random subset of this many images; 0 keeps all.
        seed: seeds the subset.
        image_size: the size an ImageFolder model was trained at (ignored by fixed-size datasets).
        val_fraction, split_seed: the checkpoint's train/val split (its training config); "val" needs
            val_fraction > 0.
    """
    if split == "val" and not val_fraction:
        raise ValueError("split 'val' needs the checkpoint's val_fraction > 0 (it was trained without one)")
    splits = load_splits(
        dataset,
        data_dir,
        augment="none",
        val_fraction=val_fraction,
        seed=split_seed,
        download=False,
        image_size=image_size,
    )
    if splits.contract != contract:
        raise ValueError(
            f"dataset {dataset!r} gives contract {splits.contract}, but the checkpoint was "
            f"trained for {contract}; pass the dataset it was trained on"
        )
    ds: Dataset = {"test": splits.test, "train": splits.train, "val": splits.val}[split]
    if limit and limit < len(ds):
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit]
        ds = Subset(ds, sorted(order.tolist()))
    images, labels = [], []
    for x, y in DataLoader(ds, batch_size=256, num_workers=0):
        images.append(to_uint8(x, contract))
        labels.append(np.asarray(y, dtype=np.int64))
    return Pixels(np.concatenate(images), np.concatenate(labels))


def to_uint8(normalised: torch.Tensor, contract: Contract) -> np.ndarray:
    """Undo the contract's normalisation: (N, C, H, W) float -> the uint8 pixels it came from.

    The datasets yield ``(p / 255 - mean) / std`` in float32; inverting it in float64 lands within
    ~1e-5 of the original integer, so rounding recovers every pixel exactly.
    """
    c = contract.channels
    mean = torch.tensor(contract.mean, dtype=torch.float64).view(1, c, 1, 1)
    std = torch.tensor(contract.std, dtype=torch.float64).view(1, c, 1, 1)
    pixels = (normalised.to(torch.float64) * std + mean) * 255.0
    return pixels.round().clamp(0, 255).to(torch.uint8).numpy()


def random_pixels(contract: Contract, n: int, seed: int) -> np.ndarray:
    """Fresh uniform-random uint8 images (N, C, H, W): inputs no training data resembles."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *contract.input_shape), dtype=np.uint8)
