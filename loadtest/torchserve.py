"""Private servers (TorchServe, or the oip runtime) for benchmarks, fault runs and the locust smoke test.

Starting, readiness and stopping are ``serving.server``'s (the same code ``make serve`` runs, with the
shipped ``serving/config.properties``); this module only moves every port a server opens — HTTP,
gRPC and the workers' socket range — to free ones, so that many servers can run one after another or
beside ``make serve`` and the other tests, and builds the two baseline archives (no-op, stock-style).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import yaml

from serving.httpclient import request
from serving.server import Server, free_port, start_server, stop_server, wait_ready, worker_pids

HANDLERS = Path(__file__).resolve().parent / "handlers"
NOOP_HANDLER, STOCK_HANDLER = HANDLERS / "noop_handler.py", HANDLERS / "stock_handler.py"


def _free_worker_base(span: int = 64) -> int:
    """A base for TorchServe's worker ports: workers talk over /tmp/.ts.sock.<port>, so pick a range
    no other server's workers use (every server defaults to 9000)."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        if not any(Path(f"/tmp/.ts.sock.{p}").exists() for p in range(base, base + span)):
            return base
    raise RuntimeError("no free TorchServe worker port range found in 20000-60000")


def private_overrides() -> dict[str, str]:
    """config.properties overrides putting every listening port of a server on a free one."""
    return {
        "inference_address": f"http://127.0.0.1:{free_port()}",
        "management_address": f"http://127.0.0.1:{free_port()}",
        "metrics_address": f"http://127.0.0.1:{free_port()}",
        "grpc_inference_port": str(free_port()),
        "grpc_management_port": str(free_port()),
        "initial_worker_port": str(_free_worker_base()),
    }


@dataclass
class PrivateServer:
    """One server of ``runtime`` serving ``models`` from ``model_store`` on free ports; a context manager."""

    model_store: Path
    models: list[str]
    workdir: Path | None = None
    ready_timeout_s: float = 240.0
    runtime: str = "torchserve"

    def __post_init__(self) -> None:
        self._own_workdir = self.workdir is None
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="ts-loadtest-"))
        self.server: Server | None = None
        self.ready_s: float | None = None
        self.overrides = private_overrides()  # kept, so that a restart comes back on the same ports

    @property
    def _dir(self) -> Path:
        assert self.workdir is not None  # __post_init__ sets it
        return self.workdir

    @property
    def _started(self) -> Server:
        if self.server is None:
            raise RuntimeError("the server is not started: call start() or use it as a context manager")
        return self.server

    @property
    def url(self) -> str:
        return self._started.local(self._started.inference_url)

    @property
    def management_url(self) -> str:
        if self._started.management_url is None:
            raise RuntimeError(f"the {self.runtime} runtime has no management API")
        return self._started.local(self._started.management_url)

    def start(self) -> Self:
        """Start and block until every model answered a real prediction; records ``ready_s``."""
        t0 = time.monotonic()
        self.server = start_server(
            self.model_store, self.models, self._dir, overrides=self.overrides, runtime=self.runtime
        )
        try:
            wait_ready(self.server, self.models, timeout=self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        stop_server(self._dir)

    def describe(self, model: str) -> dict:
        answer = request("GET", f"{self.management_url}/models/{model}", timeout=10)
        if answer.status != 200:
            raise RuntimeError(f"describe {model}: HTTP {answer.status} {answer.body[:200]!r}")
        return json.loads(answer.body)[0]

    def worker_pids(self, model: str) -> list[int]:
        if self.runtime == "oip":
            return [pid for _, pid, _ in worker_pids(self._started, model)]
        return [
            int(w["pid"])
            for w in self.describe(model).get("workers", [])
            if w.get("pid") and w.get("status") == "READY"
        ]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self._dir, ignore_errors=True)


def baseline_archive(
    handler: Path,
    name: str,
    model_store: Path,
    *,
    batch_size: int = 1,
    max_batch_delay_ms: int = 0,
    workers: int = 1,
    serialized_file: Path | None = None,
) -> Path:
    """``<model_store>/<name>.mar`` for a baseline handler, with the same TorchServe batch and worker
    keys in its model-config.yaml as ``serving.archive`` writes for the real model."""
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_store, prefix=f".{name}.staging-") as tmp:
        config = Path(tmp) / "model-config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "minWorkers": workers,
                    "maxWorkers": workers,
                    "batchSize": batch_size,
                    "maxBatchDelay": max_batch_delay_ms,
                    "responseTimeout": 30,
                }
            )
        )
        cmd = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            name,
            "--version",
            "1.0",
            "--handler",
            str(handler),
            "--config-file",
            str(config),
            "--export-path",
            tmp,
            "--force",
        ]
        if serialized_file:
            cmd += ["--serialized-file", str(serialized_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # its stderr in our error
        if proc.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed for {name}: {(proc.stderr or proc.stdout)[-300:]}")
        shutil.move(str(Path(tmp) / f"{name}.mar"), model_store / f"{name}.mar")
    return model_store / f"{name}.mar"
