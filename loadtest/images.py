"""Held-out images for load tests, and the request bodies built from them.

Load tests post real images from a test split the model never trained on: the embedded digits test
split for ``digits``, CIFAR-10's test batch for ``cifarnet`` when its files are on disk. CIFAR-10 cannot
be downloaded on an offline machine, so without its files ``cifarnet`` gets images synthesised in the
contract's shape, and ``ImagePool.source`` says so (the locustfile prints it).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.contract import Contract

# The dataset each served run was trained on (the Makefile's SERVED_RUNS).
RUN_DATASETS = {"digits": "digits", "cifarnet": "cifar10"}


@dataclass(frozen=True)
class ImagePool:
    """Encoded images ready to post, with their labels (None for synthesised images)."""

    run: str
    images: tuple[bytes, ...]   # PNG files
    labels: tuple[int | None, ...]
    source: str                 # where the images came from, said in every report

    def __len__(self) -> int:
        return len(self.images)


def encode_png(pixels: np.ndarray) -> bytes:
    """(C, H, W) uint8 -> PNG bytes (grey for C=1, RGB for C=3)."""
    hwc = np.ascontiguousarray(pixels.transpose(1, 2, 0))
    img = Image.fromarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc, mode="L" if hwc.shape[2] == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def held_out_pixels(dataset: str, data_dir: str | os.PathLike | None = None,
                    limit: int = 256) -> tuple[np.ndarray, np.ndarray, Contract]:
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


def served_contract(run: str, artifacts_dir: str | os.PathLike = "artifacts",
                    runs_dir: str | os.PathLike = "runs") -> Contract:
    """The contract a served run was exported with: ``<artifacts_dir>/<RUN>/manifest.json``, else the
    checkpoint ``<runs_dir>/<RUN>/best.pt``."""
    manifest = Path(artifacts_dir) / run / "manifest.json"
    if manifest.is_file():
        return Contract.from_dict(json.loads(manifest.read_text())["contract"])
    ckpt = Path(runs_dir) / run / "best.pt"
    if ckpt.is_file():
        from training.checkpoint import load_checkpoint
        return Contract.from_dict(load_checkpoint(ckpt)["contract"])
    raise FileNotFoundError(f"no contract for run {run!r}: neither {manifest} nor {ckpt} exists; "
                            f"export the run (make export RUN={run}) or pass the test split's files "
                            f"with --data-dir")


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


def load_pool(run: str, data_dir: str | os.PathLike | None = None, limit: int = 256,
              artifacts_dir: str | os.PathLike = "artifacts", runs_dir: str | os.PathLike = "runs") -> ImagePool:
    """Images for ``run``: its dataset's test split when available, else synthesised (cifarnet only)."""
    from training.data import DataNotFoundError

    dataset = RUN_DATASETS.get(run, run)
    try:
        pixels, labels, _ = held_out_pixels(dataset, data_dir, limit)
        where = "embedded scikit-learn digits" if dataset == "digits" else str(data_dir)
        source = f"{len(labels)} held-out test images of {dataset} ({where})"
        label_list: tuple[int | None, ...] = tuple(int(y) for y in labels)
    except DataNotFoundError:
        contract = served_contract(run, artifacts_dir, runs_dir)
        pixels = synthetic_pixels(contract, limit)
        source = (f"SYNTHESISED: {limit} random {contract.width}x{contract.height}x{contract.channels} "
                  f"images ({dataset} test split not found; pass --data-dir DIR holding "
                  f"cifar-10-batches-py to post real test images)")
        label_list = (None,) * limit
    return ImagePool(run, tuple(encode_png(p) for p in pixels), label_list, source)
