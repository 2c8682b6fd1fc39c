"""Held-out images for load tests, and the request bodies built from them.

Load tests post real images from the test split of the dataset each run was trained on, as its
export manifest (or checkpoint) records it: the embedded digits after ``make demo``, MNIST or CIFAR-10
after ``make train`` when their files are on disk. Data that cannot be found (CIFAR-10 on an offline
machine) is replaced by images synthesised in the contract's shape, and ``ImagePool.source`` says so
(the locustfile prints it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.contract import Contract
from training.images import encode_png


@dataclass(frozen=True)
class ImagePool:
    """Encoded images ready to post, with their labels (None for synthesised images)."""

    run: str
    images: tuple[bytes, ...]  # PNG files
    labels: tuple[int | None, ...]
    source: str  # where the images came from, said in every report

    def __len__(self) -> int:
        return len(self.images)


def held_out_pixels(
    dataset: str, data_dir: str | os.PathLike | None = None, limit: int = 256
) -> tuple[np.ndarray, np.ndarray, Contract]:
    """The first ``limit`` images of a dataset's test split as uint8 pixels at the contract's size.

    Returns:
        (N, C, H, W) uint8 pixels, (N,) int labels, and the dataset's contract.
    Raises:
        training.data.DataNotFoundError: the dataset's files are not on disk.
    """
    from torchvision.transforms import v2

    from training.data import DATASETS, to_contract

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    _, make_test, contract = DATASETS[dataset].load(data_dir=data_dir, download=False)
    test = make_test(v2.Compose(to_contract(contract)))  # the contract's mode and size, no normalisation
    n = min(limit, len(test))
    pairs = [test[i] for i in range(n)]
    pixels = np.stack([_chw(p) for p, _ in pairs])
    return pixels, np.asarray([int(y) for _, y in pairs]), contract


def _chw(image) -> np.ndarray:
    """A PIL image or a (C, H, W) tensor -> (C, H, W) uint8."""
    if isinstance(image, Image.Image):
        a = np.asarray(image, dtype=np.uint8)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return np.asarray(image, dtype=np.uint8)


def run_facts(
    run: str, artifacts_dir: str | os.PathLike = "artifacts", runs_dir: str | os.PathLike = "runs"
) -> tuple[str | None, Contract | None]:
    """(dataset, contract) of a run, from its export manifest ``<artifacts_dir>/<RUN>/manifest.json``,
    else its checkpoint ``<runs_dir>/<RUN>/best.pt``; (None, None) when neither exists."""
    manifest = Path(artifacts_dir) / run / "manifest.json"
    if manifest.is_file():
        doc = json.loads(manifest.read_text())
        return doc.get("source", {}).get("dataset"), Contract.from_dict(doc["contract"])
    ckpt = Path(runs_dir) / run / "best.pt"
    if ckpt.is_file():
        from training.checkpoint import load_checkpoint

        doc = load_checkpoint(ckpt)
        return doc.get("dataset"), Contract.from_dict(doc["contract"])
    return None, None


def synthetic_pixels(contract: Contract, n: int, seed: int = 0) -> np.ndarray:
    """(n, C, H, W) uint8 images in the contract's shape: smooth colour gradients plus noise, so PNG
    sizes resemble natural photos rather than pure noise (incompressible) or flat colour (tiny)."""
    rng = np.random.default_rng(seed)
    c, h, w = contract.input_shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, c, h, w), dtype=np.uint8)
    for i in range(n):
        for ch in range(c):
            a, b, phase = rng.uniform(-0.4, 0.4, size=3)
            base = 128 + 90 * np.sin(a * xx + b * yy + phase * 6)
            out[i, ch] = np.clip(base + rng.normal(0, 20, size=(h, w)), 0, 255).astype(np.uint8)
    return out


def load_pool(
    run: str,
    data_dir: str | os.PathLike | None = None,
    limit: int = 256,
    artifacts_dir: str | os.PathLike = "artifacts",
    runs_dir: str | os.PathLike = "runs",
) -> ImagePool:
    """Images for ``run``: the test split of the dataset it was trained on (its manifest says which;
    a run named after a dataset needs none) when available, else synthesised in its contract's shape.

    Raises:
        FileNotFoundError: neither the run's manifest nor its checkpoint, and the run is not named
            after a dataset: nothing says what to post.
    """
    from training.data import DATASETS, DataNotFoundError

    dataset, contract = run_facts(run, artifacts_dir, runs_dir)
    dataset = dataset or (run if run in DATASETS else None)
    if dataset is None:
        raise FileNotFoundError(
            f"nothing says what run {run!r} was trained on: neither "
            f"{Path(artifacts_dir) / run / 'manifest.json'} nor {Path(runs_dir) / run / 'best.pt'} "
            f"exists; pass --artifacts-dir (where make export wrote it)"
        )
    try:
        pixels, labels, _ = held_out_pixels(dataset, data_dir, limit)
        where = "embedded scikit-learn digits" if dataset == "digits" else str(data_dir)
        source = f"{len(labels)} held-out test images of {dataset} ({where})"
        label_list: tuple[int | None, ...] = tuple(int(y) for y in labels)
    except DataNotFoundError:
        if contract is None:
            raise
        pixels = synthetic_pixels(contract, limit)
        source = (
            f"SYNTHESISED: {limit} random {contract.width}x{contract.height}x{contract.channels} "
            f"images ({dataset} test split not found; pass --data-dir DIR holding its files "
            f"to post real test images)"
        )
        label_list = (None,) * limit
    return ImagePool(run, tuple(encode_png(p) for p in pixels), label_list, source)
