"""Shared fixtures: tiny on-disk datasets, tiny trained runs, and the session TorchServe, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/served.py
os.environ.setdefault("OMP_NUM_THREADS", "2")

from training.datafiles import write_cifar10, write_imagefolder, write_mnist_gz  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def container_config() -> Path:
    """deploy/config/config.properties, generated as make generates it for the image and the
    ConfigMap (never committed): the deploy tests and the config checks read it where the image does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("container_config", REPO / "deploy" / "container_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.render()
    return module.OUT


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
    """cifarnet trained for 2 epochs on tiny CIFAR-10 pickle batches: runs/cifarnet/best.pt. (After one
    epoch, 6 steps, its logits on random inputs stayed within 0.42 and INT8's mean error was 0.047,
    over test_export's 10 % of the scale: a check of rounding on an untrained model.)"""
    runs = tmp_path_factory.mktemp("runs")
    return train_tiny(runs, "cifarnet", "cifarnet", "cifar10", tiny_cifar_dir, epochs=2)


# --------------------------------------------------------------------------------------------------
# the session's real TorchServe (tests/served.py)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def serve_artifacts(tmp_path_factory, digits_checkpoint, cifar_checkpoint) -> tuple[Path, dict]:
    """The tiny runs exported through export's Python API: (artifacts dir, {run: manifest})."""
    from served import export_tiny

    artifacts = tmp_path_factory.mktemp("serve-artifacts")
    return artifacts, {"digits": export_tiny(digits_checkpoint, artifacts, ("onnx-fp32", "onnx-int8")),
                       "cifarnet": export_tiny(cifar_checkpoint, artifacts, ("torchscript-fp32",))}


@pytest.fixture(scope="session", params=["torchserve", "oip"])
def served(request, tmp_path_factory, serve_artifacts):
    """The running server of each runtime in turn (the tests that use it run against both): yields a
    dict with its runtime, URLs, model names, manifests, work dir and ``serving.server.Server``."""
    import json
    import shutil
    import subprocess
    import sys

    from served import LIMITS, MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, TINYQ_QUEUE
    from serving.archive import ArchiveConfig, build_archive
    from serving.server import DEFAULT_CONFIG, Server, free_port, render_config, running_pid, stop_server

    runtime = request.param
    root = tmp_path_factory.mktemp(f"serve-{runtime}")
    artifacts, manifests = serve_artifacts
    store, work = root / "model_store", root / "work"
    build_archive(ArchiveConfig(run="cifarnet", artifacts_dir=str(artifacts), model_store=str(store),
                                variant_cpu="torchscript-fp32", batch_size=4, max_batch_delay_ms=200,
                                limits=LIMITS), log=lambda _m: None)
    tinyq_artifacts = root / "tinyq-artifacts"
    shutil.copytree(artifacts / "digits", tinyq_artifacts / "tinyq")
    build_archive(ArchiveConfig(run="tinyq", artifacts_dir=str(tinyq_artifacts), model_store=str(store),
                                variant_cpu="onnx-fp32", batch_size=1, max_batch_delay_ms=0, min_workers=1,
                                max_workers=1, job_queue_size=TINYQ_QUEUE, limits=LIMITS),
                  log=lambda _m: None)
    try:
        for attempt in range(2):  # a free port can be taken by another process before TorchServe binds it
            config = root / "config.properties"
            props = render_config(DEFAULT_CONFIG, config, {
                "inference_address": f"http://127.0.0.1:{free_port()}",
                "management_address": f"http://127.0.0.1:{free_port()}",
                "metrics_address": f"http://127.0.0.1:{free_port()}",
                "grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port()),
                "max_request_size": str(MAX_REQUEST_SIZE), "max_response_size": str(MAX_RESPONSE_SIZE)})
            limit_flags = [x for f, v in vars(LIMITS).items() for x in (f"--{f.replace('_', '-')}", str(v))]
            cmd = [sys.executable, "-m", "serving", "serve", "--config", str(config),
                   "--artifacts-dir", str(artifacts), "--model-store", str(store), "--workdir", str(work),
                   "--batch-size", "4", "--max-batch-delay", "200", *limit_flags,
                   "--timeout", "300", "--token",  # token auth on, as a production server has it
                   "--runtime", runtime]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420)
            if proc.returncode == 0 or "already in use" not in proc.stderr or attempt == 1:
                break
        assert proc.returncode == 0, f"serve failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        keys = json.loads((work / "key_file.json").read_text())
        server = Server.from_config(work, running_pid(work), props, runtime=runtime)
        yield {"runtime": runtime, "server": server, "grpc": server.grpc_address, "store": store,
               "url": props["inference_address"],
               "management": props["management_address"] if runtime == "torchserve" else None,
               "metrics": props["metrics_address"], "manifests": manifests, "work": work,
               "artifacts": artifacts, "serve_output": proc.stdout,
               "token": keys["inference"]["key"], "management_token": keys["management"]["key"]}
    finally:
        stop_server(work)
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
