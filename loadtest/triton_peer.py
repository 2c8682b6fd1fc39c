"""NVIDIA Triton Inference Server as a peer: the same exported model and decode behind Triton's HTTP v2.

The ``nvidia-pytriton`` wheel (PyPI) carries a real ``tritonserver`` binary, its libraries and the
Python backend, which runs on CPU. It is a bench-only tool, installed by ``make capacity`` into its own
virtualenv made with Debian's ``/usr/bin/python3.11`` (``TRITON_VENV``): the backend's stub process
embeds the system ``libpython3.11``, and a stub mixing that with another 3.11.x build fails
(shared/notes/serving-peers.md). The wheel is installed there without its dependencies, plus numpy<2:
the backend's pybind11 reads numpy 1.x arrays only (with numpy 2 the stub dies in
``deserialize_bytes_tensor`` on the first BYTES request). The model is ``loadtest/triton/model.py`` in the
Python backend -- the project's ``InferenceCore`` per request, dynamic batching across requests -- which reaches the
project's code and virtualenv through a .pth file in the Triton venv. Requests carry the PNG bytes with Triton's
binary tensor extension (what ``tritonclient`` sends); answers are JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from serving.httpclient import NoAnswer, request
from serving.server import free_port

MODEL_PY = Path(__file__).resolve().parent / "triton" / "model.py"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TritonConfig:
    """The knobs a Triton user tunes: CPU model instances (processes), the dynamic batcher's largest and
    preferred batch and its queue delay, and the HTTP frontend's threads."""

    instances: int = 2
    max_batch: int = 8
    preferred_batch: int = 8
    queue_delay_us: int = 2000
    http_threads: int = 2
    threads: int = 1  # intra-op threads per instance

    def label(self) -> str:
        return (
            f"i{self.instances}/b{self.max_batch}/p{self.preferred_batch}/q{self.queue_delay_us}us/h{self.http_threads}"
        )


def triton_paths(venv: Path) -> tuple[Path, Path]:
    """(the wheel's ``tritonserver`` folder, its bundled libraries) inside ``venv``."""
    for site_dir in sorted(Path(venv).glob("lib/python3*/site-packages")):
        server = site_dir / "pytriton" / "tritonserver"
        if (server / "bin" / "tritonserver").is_file():
            return server, site_dir / "nvidia_pytriton.libs"
    raise FileNotFoundError(
        f"no tritonserver in {venv}; make it with: make {venv}/.stamp "
        f"(/usr/bin/python3.11 -m venv {venv} && {venv}/bin/pip install --no-deps "
        f"nvidia-pytriton==0.7.0)"
    )


def write_repository(
    root: Path, model: str, artifact_dir: Path, variant: str | None, cfg: TritonConfig, topk: int
) -> Path:
    """A Triton model repository ``root/<model>/{config.pbtxt, 1/model.py}``; returns ``root``."""
    params = {
        "artifact_dir": str(Path(artifact_dir).resolve()),
        "variant": variant or "",
        "threads": str(cfg.threads),
        "topk": str(topk),
    }
    pbtxt = "\n".join(
        [
            f'name: "{model}"',
            'backend: "python"',
            f"max_batch_size: {cfg.max_batch}",
            'input [{ name: "IMAGE" data_type: TYPE_STRING dims: [1] }]',
            "output [",
            f'  {{ name: "LABEL" data_type: TYPE_STRING dims: [{topk}] }},',
            f'  {{ name: "INDEX" data_type: TYPE_INT64 dims: [{topk}] }},',
            f'  {{ name: "PROBABILITY" data_type: TYPE_FP32 dims: [{topk}] }}',
            "]",
            (
                f"dynamic_batching {{ preferred_batch_size: [{cfg.preferred_batch}] "
                f"max_queue_delay_microseconds: {cfg.queue_delay_us} }}"
            ),
            f"instance_group [{{ count: {cfg.instances} kind: KIND_CPU }}]",
            *(f'parameters: {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in params.items()),
            "",
        ]
    )
    version = root / model / "1"
    version.mkdir(parents=True, exist_ok=True)
    (root / model / "config.pbtxt").write_text(pbtxt)
    shutil.copyfile(MODEL_PY, version / "model.py")
    return root


def infer_request(image: bytes) -> tuple[bytes, dict[str, str]]:
    """An HTTP v2 ``/infer`` body with the image as a binary BYTES tensor (4-byte length + bytes)."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "IMAGE",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(image)},
                }
            ],
            "outputs": [{"name": n} for n in ("LABEL", "INDEX", "PROBABILITY")],
        }
    ).encode()
    return header + struct.pack("<I", len(image)) + image, {"Inference-Header-Content-Length": str(len(header))}


def top1_index(body: bytes) -> int:
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    return int(outputs["INDEX"]["data"][0])


class TritonServer:
    """``tritonserver`` on free ports serving one model repository; a context manager."""

    def __init__(
        self, venv: Path, repository: Path, model: str, cfg: TritonConfig, ready_timeout_s: float = 180.0
    ) -> None:
        self.venv, self.repository, self.model, self.cfg = Path(venv), repository, model, cfg
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.ready_s = 0.0
        self.workdir = Path(tempfile.mkdtemp(prefix="triton-"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.model}/infer"

    def start(self) -> Self:
        server_dir, libs = triton_paths(self.venv)
        backends = self.workdir / "backends"
        shutil.copytree(server_dir / "backends", backends)
        # the stub built for this Python (3.11), next to the backend library, as PyTriton does
        stub = server_dir / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy(stub / "triton_python_backend_stub", backends / "python" / "triton_python_backend_stub")
        self.port = free_port()
        # The stub ignores PYTHONPATH and takes its prefix from the `python3` first on PATH (as PyTriton
        # sets it up): the Triton venv, Debian's 3.11 with its own standard library. numpy, onnxruntime,
        # Pillow, torch and the project come from the bench's virtualenv and checkout, through a .pth.
        paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], str(REPO)])
        (server_dir.parents[1] / "visionpipe-bench.pth").write_text("\n".join(paths) + "\n")
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": f"{libs}:{os.environ.get('LD_LIBRARY_PATH', '')}",
            "OMP_NUM_THREADS": str(self.cfg.threads),
            "PYTHONNOUSERSITE": "1",
            "PATH": f"{self.venv.resolve() / 'bin'}:{os.environ['PATH']}",
        }
        env.pop("PYTHONHOME", None)
        env.pop("PYTHONPATH", None)
        cmd = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-port={self.port}",
            "--allow-grpc=false",
            "--allow-metrics=false",
            f"--http-thread-count={self.cfg.http_threads}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]
        self.log = open(self.workdir / "tritonserver.log", "wb")  # noqa: SIM115 -- the server's lifetime; stop() closes it
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"tritonserver exited ({self.proc.returncode}): "
                        f"{(self.workdir / 'tritonserver.log').read_text()[-2000:]}"
                    )
                if time.monotonic() - t0 > self.ready_timeout_s:
                    raise RuntimeError(
                        f"tritonserver not ready in {self.ready_timeout_s:.0f} s; log: "
                        f"{self.workdir / 'tritonserver.log'}"
                    )
                try:
                    status = request("GET", f"{self.url}/v2/models/{self.model}/ready", timeout=2).status
                except NoAnswer:
                    status = 0
                if status == 200:
                    break
                time.sleep(0.5)
        except BaseException:
            self.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)  # __exit__ never runs for a failed start
            raise
        self.ready_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its stub processes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
