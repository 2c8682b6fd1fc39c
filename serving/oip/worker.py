"""One worker process of the Open Inference Protocol runtime: load every model, then serve.

Started by the supervisor (``serving.oip.supervisor``) with the metrics socket it bound (shared: any
worker answers a scrape with every worker's values) and the run settings in a JSON file. Models load
before anything is served: a worker that accepts a connection can answer it. Each worker binds the
HTTP and gRPC ports itself with SO_REUSEPORT, so the kernel spreads new connections evenly over the
workers (with one shared listening socket, whichever worker woke first took a whole burst: 16 of 16
connections of a load test on one of two workers).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import uvicorn

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


async def serve(cfg: dict, rt: Runtime, loaded: dict, metrics_sock: socket.socket, ready_file: Path) -> None:
    import grpc

    from serving.oip import grpc_service
    from serving.oip.batching import Batcher
    from serving.oip.http import App, protocol_for

    workers = cfg["workers"]
    rt.models = {name: (m, Batcher(m, max(1, m.spec.job_queue_size // workers))) for name, m in loaded.items()}
    rt.ready = True
    app = App(rt)
    grpc_server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", rt.http_limits.max_request_bytes), ("grpc.so_reuseport", 1)]
    )
    grpc_service.add_to(grpc_server, rt, app)
    grpc_server.add_insecure_port(cfg["grpc"])
    await grpc_server.start()
    config = uvicorn.Config(
        app,
        http=protocol_for(rt.http_limits),
        lifespan="off",
        ws="none",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=int(rt.http_limits.keepalive_s),
        timeout_graceful_shutdown=cfg["drain_s"],
        server_header=False,
        date_header=False,
    )
    config.load()
    server = AcceptingServer(config)
    loop = asyncio.get_running_loop()

    def make_protocol():  # what uvicorn's own create_server would build for each connection
        return config.http_protocol_class(
            config=config, server_state=server.server_state, app_state=server.lifespan.state, _loop=loop
        )

    from serving.oip.supervisor import bind

    http_sock = bind(cfg["http"], "http", reuse_port=True)
    stop_accepting = accept_all(loop, http_sock, make_protocol)

    # On SIGTERM: no new connections here (the kernel sends them to the other workers). Done by the loop,
    # not in the signal handler: that runs between any two bytecodes of a request or a batch, and
    # anything it raised would land there (a request answered 500).
    def on_exit() -> None:
        loop.call_soon_threadsafe(stop_accepting)

    server.on_exit = on_exit

    async def announce() -> None:  # the supervisor counts a worker up once it serves
        while not server.started:
            await asyncio.sleep(0.01)
        ready_file.write_text(str(os.getpid()))

    announcer = asyncio.ensure_future(announce())
    await server.serve(sockets=[metrics_sock])  # the inference socket is accept_all's
    announcer.cancel()
    await grpc_server.stop(cfg["drain_s"])


class AcceptingServer(uvicorn.Server):
    """uvicorn's Server, telling ``on_exit`` when a SIGTERM/SIGINT starts the drain (to stop ``accept_all``)."""

    on_exit: Callable[[], None] = staticmethod(lambda: None)

    def handle_exit(self, sig, frame) -> None:
        # Once: a second SIGTERM (the process group's, then the supervisor's) finds nothing left to do.
        on_exit, self.on_exit = self.on_exit, AcceptingServer.on_exit
        on_exit()
        super().handle_exit(sig, frame)


def accept_all(loop: asyncio.AbstractEventLoop, listener: socket.socket, make_protocol, per_wakeup: int = 512):
    """Accept every pending connection each time the listener is readable; returns the stop function.

    uvloop's own server accepts one connection per loop iteration, and an iteration here includes a
    model call: a burst of new clients waited in the kernel's backlog, one model call each, and was
    never refused (12 concurrent clients of a busy model: 0 of them refused, 9 with every pending
    connection accepted at once). asyncio's server accepts up to 100 at once but its loop is slower.
    """
    listener.setblocking(False)

    def on_readable() -> None:
        for _ in range(per_wakeup):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors, ...: leave the rest in the backlog for now
                logger.warning("accept failed: %s", e)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop.create_task(loop.connect_accepted_socket(make_protocol, conn))

    loop.add_reader(listener.fileno(), on_readable)

    def stop() -> None:
        if listener.fileno() != -1:  # not stopped yet
            loop.remove_reader(listener.fileno())
            listener.close()

    return stop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.oip.worker")
    p.add_argument("--config", required=True)
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--metrics-fd", type=int, required=True)
    a = p.parse_args(argv)
    cfg = json.loads(Path(a.config).read_text())
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s [W{a.slot} %(process)d] %(levelname)s %(name)s: %(message)s",
    )
    from serving.oip.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    metrics_sock = socket.socket(fileno=a.metrics_fd)
    rt = Runtime(
        token=cfg.get("token"),
        metrics=metrics,
        metrics_port=metrics_sock.getsockname()[1],
        http_limits=HttpLimits(**cfg["http_limits"]),
        version=project_version(),
    )
    try:
        loaded = load_models(
            [ModelSpec.from_json(s) for s in cfg["models"]], gpu_for(cfg["device"], a.slot), metrics, a.slot
        )
    except Exception as e:
        logger.exception("worker %d: loading failed", os.getpid())
        print(f"LOAD FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return EXIT_LOAD_FAILED
    # uvicorn re-raises the SIGTERM it caught once it has drained; the process then leaves normally
    signal.signal(signal.SIGTERM, lambda *_: None)
    ready_file = Path(cfg["run_dir"]) / f"worker-{a.slot}.ready"
    if cfg["loop"] == "uvloop":
        import uvloop

        uvloop.run(serve(cfg, rt, loaded, metrics_sock, ready_file))
    else:
        asyncio.run(serve(cfg, rt, loaded, metrics_sock, ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
