"""Writers for tiny datasets in the exact on-disk formats the real loaders read.

Images are class-dependent patterns plus noise, so a model can learn them in one epoch.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import CIFAR10_NAMES


def pattern_images(n: int, h: int, w: int, c: int, classes: int = 10, seed: int = 0):
    """(n, h, w, c) uint8 images whose bright stripe position encodes the label, and the labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, h, w, c), dtype=np.uint8)
    band = max(1, h // classes)
    for i, y in enumerate(labels):
        top = (y * h) // classes
        images[i, top : top + band, :, :] = 230
    return images, labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format (big-endian magic 0x0000 08 ndim, then dims, then uint8 data), gzip-compressed."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_gz(root: Path, n_train: int = 300, n_test: int = 100) -> Path:
    """The four MNIST/Fashion-MNIST IDX .gz files side by side in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = pattern_images(n, 28, 28, 1, seed=seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def write_cifar10(root: Path, per_batch: int = 40, n_test: int = 60) -> Path:
    """CIFAR-10 python pickle batches (data_batch_1..5, test_batch, batches.meta) under
    ``root/cifar-10-batches-py``; returns ``root``."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    batches = [(f"data_batch_{i}", per_batch, 10 + i) for i in range(1, 6)] + [("test_batch", n_test, 99)]
    for name, n, seed in batches:
        images, labels = pattern_images(n, 32, 32, 3, seed=seed)
        # The real batches were pickled by Python 2: str keys, read back with encoding="latin1".
        entry = {
            "batch_label": name,
            "labels": [int(x) for x in labels],
            "data": images.transpose(0, 3, 1, 2).reshape(n, -1),  # rows of R..G..B planes
            "filenames": [f"{name}_{k}.png" for k in range(n)],
        }
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump(
            {"label_names": list(CIFAR10_NAMES), "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2
        )
    return root


def write_imagefolder(
    root: Path, classes=("ants", "bees"), per_class: int = 12, split: bool = True, size: int = 48
) -> Path:
    """A class-per-folder tree of PNG/JPEG files; with ``split``, under train/ and val/."""
    parts = (("train", per_class), ("val", max(2, per_class // 3))) if split else (("", per_class),)
    for part, n in parts:
        for k, cls in enumerate(classes):
            d = root / part / cls if part else root / cls
            d.mkdir(parents=True, exist_ok=True)
            images, _ = pattern_images(n, size, size, 3, classes=len(classes), seed=k + len(part))
            for i in range(n):
                img = images[i].copy()
                img[..., k] = 250  # class colour
                Image.fromarray(img).save(d / f"{cls}_{i}.{'png' if i % 2 else 'jpg'}")
    return root
