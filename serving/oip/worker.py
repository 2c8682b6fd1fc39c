"""One worker process of the Open Inference Protocol runtime: load every model, then serve.

Started by the supervisor (``serving.oip.supervisor``) with the listening sockets it bound (HTTP and
metrics, shared by all workers: the kernel hands each new connection to one of them) and the run
settings in a JSON file. Models load before the sockets are served: a worker that accepts a
connection can answer it. gRPC is served from the same event loop on a port every worker binds with
SO_REUSEPORT (grpcio's default on Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from serving.oip.http import HttpLimits
from serving.oip.mar import ModelSpec

logger = logging.getLogger("serving.oip.worker")
EXIT_LOAD_FAILED = 3  # the supervisor does not restart a worker that never loaded its models


@dataclass
class Runtime:
    """What the routes and the gRPC servicer of one worker read."""

    models: dict = field(default_factory=dict)  # name -> (LoadedModel, Batcher)
    token: str | None = None
    ready: bool = False
    metrics: object = None  # serving.oip.metrics.WorkerMetrics
    metrics_port: int | None = None
    http_limits: HttpLimits = HttpLimits()
    version: str = "0"


def project_version() -> str:
    try:
        return version("visionpipe")
    except PackageNotFoundError:  # run from a bare copy of the tree (the GPU check)
        return "0+unknown"


def gpu_for(device: str, slot: int) -> int | None:
    """TorchServe's ``gpu_id`` for this worker: round-robin over the GPUs, None on CPU."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        if device == "cuda":
            raise SystemExit("error: --device cuda but CUDA is not available here; use --device auto or cpu")
        return None
    return slot % torch.cuda.device_count()


def load_models(specs: list[ModelSpec], gpu_id: int | None, metrics, slot: int) -> dict:
    from serving.oip.batching import LoadedModel, load_service

    loaded = {}
    for spec in specs:
        t0 = time.perf_counter()
        service = load_service(spec, gpu_id, metrics.cache(spec.name))
        loaded[spec.name] = LoadedModel(spec, service, metrics)
        # TorchServe's worker name, W-<n>-<model>_<version>: n is the slot, which a restarted worker keeps,
        # so the restart alert sees the series change (deploy/observability.py, VisionpipeWorkerRestarted)
        metrics.worker_loaded(f"W-{slot}-{spec.name}_{spec.version}", (time.perf_counter() - t0) * 1e3)
        logger.info("worker %d: %s loaded in %.0f ms", os.getpid(), spec.name, (time.perf_counter() - t0) * 1e3)
    return loaded


async def serve(cfg: dict, rt: Runtime, loaded: dict, http_sock: socket.socket, metrics_sock: socket.socket,
                ready_file: Path) -> None:
    import grpc
    import uvicorn

    from serving.oip import grpc_service
    from serving.oip.batching import Batcher
    from serving.oip.http import App, protocol_for

    workers = cfg["workers"]
    rt.models = {name: (m, Batcher(m, max(1, m.spec.job_queue_size // workers))) for name, m in loaded.items()}
    rt.ready = True
    app = App(rt)
    grpc_server = grpc.aio.server(options=[("grpc.max_receive_message_length", rt.http_limits.max_request_bytes),
                                           ("grpc.so_reuseport", 1)])
    grpc_service.add_to(grpc_server, rt, app)
    grpc_server.add_insecure_port(cfg["grpc"])
    await grpc_server.start()
    config = uvicorn.Config(app, http=protocol_for(rt.http_limits), lifespan="off", ws="none",
                            access_log=False, log_level="warning", timeout_keep_alive=int(rt.http_limits.keepalive_s),
                            timeout_graceful_shutdown=cfg["drain_s"], server_header=False, date_header=False)
    server = uvicorn.Server(config)

    async def announce() -> None:  # the supervisor counts a worker up once it serves
        while not server.started:
            await asyncio.sleep(0.01)
        ready_file.write_text(str(os.getpid()))

    announcer = asyncio.ensure_future(announce())
    await server.serve(sockets=[http_sock, metrics_sock])
    announcer.cancel()
    await grpc_server.stop(cfg["drain_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.oip.worker")
    p.add_argument("--config", required=True)
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--http-fd", type=int, required=True)
    p.add_argument("--metrics-fd", type=int, required=True)
    a = p.parse_args(argv)
    cfg = json.loads(Path(a.config).read_text())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s [W{a.slot} %(process)d] %(levelname)s %(name)s: %(message)s")
    from serving.oip.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    http_sock = socket.socket(fileno=a.http_fd)
    metrics_sock = socket.socket(fileno=a.metrics_fd)
    rt = Runtime(token=cfg.get("token"), metrics=metrics, metrics_port=metrics_sock.getsockname()[1],
                 http_limits=HttpLimits(**cfg["http_limits"]), version=project_version())
    try:
        loaded = load_models([ModelSpec.from_json(s) for s in cfg["models"]], gpu_for(cfg["device"], a.slot), metrics,
                             a.slot)
    except Exception as e:  # noqa: BLE001 -- one line for the supervisor's log; the traceback above it
        logger.exception("worker %d: loading failed", os.getpid())
        print(f"LOAD FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return EXIT_LOAD_FAILED
    # uvicorn re-raises the SIGTERM it caught once it has drained; the process then leaves normally
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        import uvloop

        uvloop.run(serve(cfg, rt, loaded, http_sock, metrics_sock, Path(cfg["run_dir"]) / f"worker-{a.slot}.ready"))
    except ImportError:  # pragma: no cover -- uvloop is a dependency; plain asyncio works too
        asyncio.run(serve(cfg, rt, loaded, http_sock, metrics_sock, Path(cfg["run_dir"]) / f"worker-{a.slot}.ready"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
