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

    cfg = TrainConfig(run=run, model=model, dataset=dataset,
                      data_dir=str(data_dir) if data_dir else None, runs_dir=str(runs_dir),
                      epochs=epochs, batch_size=32, workers=0, tensorboard=False, **overrides)
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


@pytest.fixture(scope="session")
def digits_server(tmp_path_factory, digits_checkpoint):
    """TorchServe (serving.server, shipped config, private ports) serving the tiny digits run's ONNX
    variant through the real handler, batch 4."""
    from export.core import ExportConfig, export_run
    from loadtest.torchserve import PrivateServer
    from serving.archive import ArchiveConfig, build_archive

    root = tmp_path_factory.mktemp("loadtest-serve")
    export_run(ExportConfig(run="digits", runs_dir=str(digits_checkpoint.parent.parent),
                            out_dir=str(root / "artifacts"), checkpoint=str(digits_checkpoint),
                            variants=("onnx-fp32",), calib_size=64, check_size=64, eval_size=120,
                            latency_rounds=0, max_int8_drop=100.0), log=lambda _m: None)
    build_archive(ArchiveConfig(run="digits", artifacts_dir=str(root / "artifacts"),
                                model_store=str(root / "store"), variant_cpu="onnx-fp32", batch_size=4,
                                max_batch_delay_ms=5, min_workers=1, max_workers=1), log=lambda _m: None)
    with PrivateServer(root / "store", ["digits"], workdir=root / "work") as server:
        yield server
