"""Start a private TorchServe for benchmarks, fault runs and tests, and talk to its management API.

The ``torchserve`` launcher script keeps one global pid file (``/tmp/.model_server.pid``) and refuses
to start a second server, and every server defaults to the same gRPC ports and worker socket names;
benchmarks start many servers while other servers (``make serve``, tests) may be up. So this module
builds the same ``java ... org.pytorch.serve.ModelServer`` command the launcher builds, with every port
(HTTP, gRPC, worker sockets) chosen free, and owns the process it starts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_worker_base(span: int = 64) -> int:
    """A base for TorchServe's worker ports: workers talk over /tmp/.ts.sock.<port>, so pick a range
    with no such socket files (another server's workers)."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        if not any(Path(f"/tmp/.ts.sock.{p}").exists() for p in range(base, base + span)):
            return base
    raise RuntimeError("no free TorchServe worker port range found in 20000-60000")


@dataclass(frozen=True)
class ModelSettings:
    """TorchServe's per-model knobs, as the management API takes them."""

    batch_size: int = 1
    max_batch_delay_ms: int = 0
    workers: int = 1
    response_timeout_s: int = 30


@dataclass
class TorchServe:
    """A TorchServe process on free ports with its own work directory (config, logs)."""

    model_store: Path
    env: dict[str, str] = field(default_factory=dict)   # extra environment for frontend and workers
    max_request_size: int = 6553500                      # bytes; TorchServe's default
    job_queue_size: int = 1000
    workdir: Path | None = None

    def __post_init__(self) -> None:
        self.model_store = Path(self.model_store).resolve()
        self._own_workdir = self.workdir is None
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="ts-loadtest-"))
        self.inference_port, self.management_port, self.metrics_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def _write_config(self) -> Path:
        cfg = self.workdir / "config.properties"
        cfg.write_text("\n".join([
            f"inference_address=http://127.0.0.1:{self.inference_port}",
            f"management_address=http://127.0.0.1:{self.management_port}",
            f"metrics_address=http://127.0.0.1:{self.metrics_port}",
            f"grpc_inference_port={free_port()}",
            f"grpc_management_port={free_port()}",
            f"initial_worker_port={_free_worker_base()}",
            f"model_store={self.model_store}",
            "disable_token_authorization=true",
            "enable_model_api=true",
            "install_py_dep_per_model=false",
            "default_workers_per_model=1",
            f"max_request_size={self.max_request_size}",
            f"job_queue_size={self.job_queue_size}",
            # Logging every request synchronously costs throughput on 2 cores; keep it off the hot path.
            "async_logging=true",
            "disable_system_metrics=true",
            "",
        ]))
        return cfg

    def command(self, config: Path) -> list[str]:
        import ts

        ts_home = Path(ts.__file__).resolve().parent.parent
        java = str(Path(os.environ["JAVA_HOME"]) / "bin" / "java") if os.environ.get("JAVA_HOME") else "java"
        return [java, f"-Dmodel_server_home={ts_home}", "-Xmx1g", "-cp", f".:{ts_home / 'ts' / 'frontend'}/*",
                "org.pytorch.serve.ModelServer", "--python", sys.executable, "-f", str(config),
                "-s", str(self.model_store), "-ncs", "--disable-token-auth", "--enable-model-api"]

    def start(self, timeout_s: float = 60.0) -> "TorchServe":
        config = self._write_config()
        env = {**os.environ, "LOG_LOCATION": str(self.workdir / "logs"),
               "METRICS_LOCATION": str(self.workdir / "logs"), **self.env}
        # Workers inherit the venv's bin first so `python` resolves to the venv everywhere.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        self._log = open(self.workdir / "frontend.out", "wb")
        self.proc = subprocess.Popen(self.command(config), cwd=self.workdir, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.proc.returncode}; see "
                                   f"{self.workdir / 'frontend.out'}")
            try:
                if json.loads(_http("GET", f"{self.url}/ping", timeout=2)[1]).get("status") == "Healthy":
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"TorchServe did not answer /ping within {timeout_s:.0f} s")

    def register(self, mar: str, name: str, settings: ModelSettings = ModelSettings(),
                 timeout_s: float = 120.0) -> dict:
        """Register ``mar`` (a file name in the model store) and wait until its workers are ready."""
        query = urllib.parse.urlencode({
            "url": mar, "model_name": name, "batch_size": settings.batch_size,
            "max_batch_delay": settings.max_batch_delay_ms, "initial_workers": settings.workers,
            "response_timeout": settings.response_timeout_s, "synchronous": "true"})
        status, body = _http("POST", f"{self.management_url}/models?{query}", timeout=timeout_s)
        if status != 200:
            raise RuntimeError(f"registering {mar} as {name} failed: HTTP {status} {body[:300]!r}; "
                               f"see {self.workdir / 'logs'}")
        return self.describe(name)

    def describe(self, name: str) -> dict:
        status, body = _http("GET", f"{self.management_url}/models/{name}", timeout=10)
        if status != 200:
            raise RuntimeError(f"describe {name}: HTTP {status} {body[:200]!r}")
        return json.loads(body)[0]

    def worker_pids(self, name: str) -> list[int]:
        return [int(w["pid"]) for w in self.describe(name).get("workers", []) if w.get("pid")]

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group (frontend and its workers), SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None):
            self._log.close()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "TorchServe":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 10.0,
          headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def archive(handler: Path, name: str, export_path: Path, extra_files: list[Path] = (),
            serialized_file: Path | None = None, config_file: Path | None = None) -> Path:
    """torch-model-archiver into ``export_path/<name>.mar`` (overwritten)."""
    export_path.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
           "--handler", str(handler), "--export-path", str(export_path), "--force"]
    if serialized_file:
        cmd += ["--serialized-file", str(serialized_file)]
    if extra_files:
        cmd += ["--extra-files", ",".join(str(p) for p in extra_files)]
    if config_file:
        cmd += ["--config-file", str(config_file)]
    subprocess.run(cmd, check=True, capture_output=True)
    return export_path / f"{name}.mar"
