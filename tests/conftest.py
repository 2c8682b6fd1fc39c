"""Shared fixtures: tiny on-disk datasets, tiny trained runs, and the session TorchServe, built once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/datafiles.py
os.environ.setdefault("OMP_NUM_THREADS", "2")

from datafiles import write_cifar10, write_imagefolder, write_mnist_gz  # noqa: E402

from serving.core import Limits  # noqa: E402
from serving.server import read_properties, stop_server  # noqa: E402

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


# --------------------------------------------------------------------------------------------------
# the session TorchServe (test_serving_server.py, test_observability.py): one per test session
# --------------------------------------------------------------------------------------------------
LIMITS = Limits(max_images=4, max_pixels=1_000_000, max_image_bytes=200_000)
MAX_REQUEST_SIZE = 1_000_000  # TorchServe's own body limit in this test server


def _export(checkpoint: Path, out: Path, variants: tuple[str, ...]) -> dict:
    from export.core import ExportConfig, export_run

    cfg = ExportConfig(run=checkpoint.parent.name, runs_dir=str(checkpoint.parent.parent),
                       out_dir=str(out), checkpoint=str(checkpoint), variants=variants,
                       calib_size=64, check_size=64, eval_size=120, latency_rounds=0,
                       max_int8_drop=100.0)  # plumbing, not accuracy: a 1-epoch model may be noisy
    return export_run(cfg, log=lambda _msg: None)


@pytest.fixture(scope="session")
def serve_artifacts(tmp_path_factory, digits_checkpoint, cifar_checkpoint) -> tuple[Path, dict]:
    """The tiny runs exported through export's Python API: (artifacts dir, {run: manifest})."""
    artifacts = tmp_path_factory.mktemp("serve-artifacts")
    return artifacts, {"digits": _export(digits_checkpoint, artifacts, ("onnx-fp32", "onnx-int8")),
                       "cifarnet": _export(cifar_checkpoint, artifacts, ("torchscript-fp32",))}


@pytest.fixture(scope="session")
def served(tmp_path_factory, serve_artifacts):
    """The running server: yields a dict with its URLs, model names, manifests and work dir."""
    from serving.archive import ArchiveConfig, build_archive
    from serving.server import free_port

    root = tmp_path_factory.mktemp("serve")
    artifacts, manifests = serve_artifacts
    store, work = root / "model_store", root / "work"
    build_archive(ArchiveConfig(run="cifarnet", artifacts_dir=str(artifacts), model_store=str(store),
                                variant_cpu="torchscript-fp32", batch_size=4, max_batch_delay_ms=200,
                                limits=LIMITS), log=lambda _m: None)
    try:
        for attempt in range(2):  # a free port can be taken by another process before TorchServe binds it
            props = read_properties(REPO / "serving" / "config.properties")
            props.update({"inference_address": f"http://127.0.0.1:{free_port()}",
                          "management_address": f"http://127.0.0.1:{free_port()}",
                          "metrics_address": f"http://127.0.0.1:{free_port()}",
                          "grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port()),
                          "max_request_size": str(MAX_REQUEST_SIZE),
                          "metrics_config": str(REPO / "serving" / "metrics.yaml")})
            config = root / "config.properties"
            config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
            cmd = [sys.executable, "-m", "serving", "serve", "--config", str(config),
                   "--artifacts-dir", str(artifacts), "--model-store", str(store), "--workdir", str(work),
                   "--batch-size", "4", "--max-batch-delay", "200", "--max-images", str(LIMITS.max_images),
                   "--max-pixels", str(LIMITS.max_pixels), "--max-image-bytes", str(LIMITS.max_image_bytes),
                   "--timeout", "300", "--token"]  # token auth on, as a production server has it
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420)
            if proc.returncode == 0 or "already in use" not in proc.stderr or attempt == 1:
                break
        assert proc.returncode == 0, f"serve failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        keys = json.loads((work / "key_file.json").read_text())
        yield {"url": props["inference_address"], "management": props["management_address"],
               "metrics": props["metrics_address"], "manifests": manifests, "work": work,
               "artifacts": artifacts, "serve_output": proc.stdout,
               "token": keys["inference"]["key"], "management_token": keys["management"]["key"]}
    finally:
        stop_server(work)
