"""Shared fixtures: tiny on-disk datasets and tiny trained runs, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/datafiles.py
os.environ.setdefault("OMP_NUM_THREADS", "2")

from datafiles import write_cifar10, write_imagefolder, write_mnist_gz  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory) -> Path:
    return write_mnist_gz(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def tiny_cifar_dir(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"))


def train_tiny(runs_dir: Path, run: str, model: str, dataset: str, data_dir: Path | None = None,
               epochs: int = 1, **overrides) -> Path:
    """Train in-process with the real trainer; returns best.pt."""
    from training.config import TrainConfig
    from training.train import fit

    # min_steps=0: a smoke run makes only the steps its epochs hold (the default floor would stretch
    # a 1-epoch run on tiny data to 500 steps).
    settings = dict(batch_size=32, workers=0, tensorboard=False, min_steps=0)
    cfg = TrainConfig(run=run, model=model, dataset=dataset,
                      data_dir=str(data_dir) if data_dir else None, runs_dir=str(runs_dir),
                      epochs=epochs, **{**settings, **overrides})
    return fit(cfg)


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A small CNN trained for 2 epochs on the embedded digits: runs/digits/best.pt."""
    runs = tmp_path_factory.mktemp("runs")
    return train_tiny(runs, "digits", "simple_cnn", "digits", epochs=2, lr=3e-3)


@pytest.fixture(scope="session")
def cifar_checkpoint(tmp_path_factory, tiny_cifar_dir) -> Path:
    """cifarnet trained for 1 epoch on tiny CIFAR-10 pickle batches: runs/cifarnet/best.pt."""
    runs = tmp_path_factory.mktemp("runs")
    return train_tiny(runs, "cifarnet", "cifarnet", "cifar10", tiny_cifar_dir, epochs=1)
