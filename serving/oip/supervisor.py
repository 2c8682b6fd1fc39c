"""The Open Inference Protocol runtime's main process: archives, sockets, workers, drain.

It unpacks the archives once, checks the HTTP and gRPC ports are free and binds the metrics socket (so
a taken port is one clear error, before any model loads), starts the worker processes (each binds the
HTTP and gRPC ports itself with SO_REUSEPORT: the kernel spreads new connections over them), restarts a worker that dies
after it was up, gives up when one dies while loading (a broken archive does not heal), and on SIGTERM
or SIGINT lets every worker drain (in-flight requests answered) before it exits 0. No Java, no
management API: what is served is what the archives named at start hold.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serving.oip.http import HttpLimits
from serving.oip.mar import open_archives
from serving.oip.metrics import prepare_multiprocess_dir
from training.files import atomic_write_json

logger = logging.getLogger("serving.oip")
WORKERS_FILE, KEY_FILE = "workers.json", "key_file.json"


class StartError(RuntimeError):
    """The runtime cannot start: a port is taken, an archive is missing, a worker failed to load."""


@dataclass(frozen=True)
class RuntimeConfig:
    """The runtime's settings, parsed once from the command line.

    Attributes:
        model_store, models: serve ``<model_store>/<name>.mar`` for each name.
        http, grpc, metrics: ``host:port`` of each listener.
        workers: worker processes; each serves every model (None: the archives' largest maxWorkers).
        device: auto (CUDA when available), cpu or cuda.
        workdir: unpacked archives, worker logs, workers.json, key_file.json, metric files.
        token: require ``Authorization: Bearer <key>`` on inference routes (key in key_file.json).
        drain_s: seconds a worker may take to answer what is in flight after SIGTERM.
        loop: the workers' event loop, uvloop (faster) or asyncio.
    """

    model_store: str = "model_store"
    models: tuple[str, ...] = ()
    http: str = "127.0.0.1:8080"
    grpc: str = "127.0.0.1:8081"
    metrics: str = "127.0.0.1:8082"
    workers: int | None = None
    device: str = "auto"
    workdir: str = "logs/oip"
    token: bool = False
    drain_s: int = 30
    loop: str = "uvloop"
    http_limits: HttpLimits = field(default_factory=HttpLimits)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise StartError(f"address {address!r} is not host:port (e.g. 127.0.0.1:8080)")
    return host, int(port)


def bind(address: str, what: str, reuse_port: bool = False) -> socket.socket:
    """A listening socket on ``address``; ``reuse_port``: one of several (one per worker) on the port."""
    host, port = _split(address)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartError(
            f"{what} address {address} is already in use or not available ({e.strerror}); stop "
            f"what listens there (make stop) or pick another port"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def check_free(address: str, what: str) -> None:
    bind(address, what).close()


class Supervisor:
    def __init__(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg
        self.workdir = Path(cfg.workdir).resolve()
        self.run_dir = self.workdir / "run"
        self.procs: dict[int, subprocess.Popen] = {}
        self.started: dict[int, float] = {}
        self.up: set[int] = set()
        self.restarts = 0
        self.stopping = False

    def prepare(self) -> None:
        cfg = self.cfg
        if not cfg.models:
            raise StartError(f"no models to serve: name them (--models) or put archives in {cfg.model_store}/")
        check_free(cfg.http, "http")
        self.metrics_sock = bind(cfg.metrics, "metrics")
        check_free(cfg.grpc, "grpc")
        self.specs = open_archives(Path(cfg.model_store), list(cfg.models), self.workdir)
        self.n = cfg.workers or max(s.max_workers for s in self.specs)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for f in self.run_dir.glob("worker-*.ready"):
            f.unlink()
        prometheus_dir = self.workdir / "prometheus"
        prepare_multiprocess_dir(prometheus_dir)
        token = None
        if cfg.token:  # TorchServe's key_file.json layout, so clients read either runtime's the same way
            token = secrets.token_urlsafe(24)
            atomic_write_json(self.workdir / KEY_FILE, {"inference": {"key": token}, "management": {"key": token}})
        else:
            (self.workdir / KEY_FILE).unlink(missing_ok=True)
        self.settings = self.run_dir / "settings.json"
        atomic_write_json(
            self.settings,
            {
                "models": [s.to_json() for s in self.specs],
                "grpc": cfg.grpc,
                "http": cfg.http,
                "workers": self.n,
                "device": cfg.device,
                "token": token,
                "drain_s": cfg.drain_s,
                "run_dir": str(self.run_dir),
                "loop": cfg.loop,
                "http_limits": asdict(cfg.http_limits),
            },
        )
        self.env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(prometheus_dir),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }

    def spawn(self, slot: int) -> None:
        (self.run_dir / f"worker-{slot}.ready").unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "serving.oip.worker",
            "--config",
            str(self.settings),
            "--slot",
            str(slot),
            "--metrics-fd",
            str(self.metrics_sock.fileno()),
        ]
        self.procs[slot] = subprocess.Popen(cmd, env=self.env, pass_fds=(self.metrics_sock.fileno(),))
        self.started[slot] = time.time()
        self.up.discard(slot)
        self.write_workers()

    def write_workers(self) -> None:
        atomic_write_json(
            self.workdir / WORKERS_FILE,
            {
                "supervisor": os.getpid(),
                "restarts": self.restarts,
                "workers": [
                    {"slot": s, "pid": p.pid, "started": self.started[s], "ready": s in self.up}
                    for s, p in sorted(self.procs.items())
                ],
            },
        )

    def run(self) -> int:
        self.prepare()
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for slot in range(self.n):
            self.spawn(slot)
        logger.info(
            "serving %s with %d worker(s): http %s, grpc %s, metrics %s",
            ", ".join(self.cfg.models),
            self.n,
            self.cfg.http,
            self.cfg.grpc,
            self.cfg.metrics,
        )
        while not self.stopping:
            self._watch()
            time.sleep(0.1)
        return self._drain()

    def _watch(self) -> None:
        for slot, proc in list(self.procs.items()):
            if slot not in self.up and (self.run_dir / f"worker-{slot}.ready").is_file():
                self.up.add(slot)
                self.write_workers()
                if len(self.up) == self.n:
                    logger.info("all %d worker(s) up", self.n)
            code = proc.poll()
            if code is None or self.stopping:
                continue
            if slot not in self.up:
                self._stop_all()
                raise StartError(
                    f"worker {slot} exited with code {code} while loading its models; its log lines above say why"
                )
            logger.warning("worker %d (pid %d) died with code %s; restarting it", slot, proc.pid, code)
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(proc.pid, str(self.workdir / "prometheus"))
            self.restarts += 1
            self.spawn(slot)

    def _stop(self, signum, _frame) -> None:
        logger.info("signal %d: draining", signum)
        self.stopping = True

    def _stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(self.cfg.drain_s + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _drain(self) -> int:
        self.metrics_sock.close()
        self._stop_all()
        logger.info("stopped")
        return 0
