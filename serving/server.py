"""Start, warm up and stop a real server of either runtime: used by ``make serve`` / ``make stop``, the
load tests, the benchmarks and the tests.

Two runtimes serve the same ``model_store/<RUN>.mar``: ``torchserve`` (TorchServe's Java frontend and
Python workers, the default) and ``oip`` (``serving.oip``: no Java; Open Inference Protocol over HTTP
and gRPC). Both read their addresses from the same ``config.properties`` (inference, metrics and gRPC
inference address), write their pid file, logs and ``key_file.json`` to one work directory, and are
stopped the same way (their whole process group). ``worker_pids`` and ``worker_deaths`` tell, for
either runtime, which worker processes serve a model and whether one was restarted.

TorchServe is launched as ``<venv>/bin/torchserve --foreground`` in its own process group, so that the
Java frontend and its Python workers can always be stopped together (``stop_server``) and nothing leaks.
The ``torchserve`` launcher passes its own interpreter to the frontend as the worker Python
(``--python sys.executable``): started from the venv, workers import ``serving``, ``export`` and
``training`` from the installed project. Everything a server writes (rendered config, logs, pid file,
TorchServe's temp dir with the unpacked archives, ``key_file.json`` when token auth is on) stays in
one work directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from serving import httpclient
from serving.httpclient import NoAnswer
from serving.java import java_env
from training.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "serving" / "config.properties"
PID_FILE, CONFIG_FILE, KEY_FILE = "server.pid", "config.properties", "key_file.json"
RUNTIMES = ("torchserve", "oip")
LOG_FILES = {"torchserve": "torchserve.log", "oip": "oip.log"}
LOG_FILE = LOG_FILES["torchserve"]


class ServerError(RuntimeError):
    """TorchServe did not start, did not get ready in time, or a model failed its warm-up."""


class ServerBusyError(ServerError):
    """A server already runs from this work directory, or a configured port is taken."""


# --------------------------------------------------------------------------------------------------
# config.properties
# --------------------------------------------------------------------------------------------------
def read_properties(path: str | os.PathLike) -> dict[str, str]:
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def render_config(
    base: str | os.PathLike, out: str | os.PathLike, overrides: dict[str, str] | None = None
) -> dict[str, str]:
    """Write ``base`` with ``overrides`` applied and relative file paths made absolute (against the repo
    root, where the base file's paths point), since TorchServe runs in the work directory."""
    props = {**read_properties(base), **(overrides or {})}
    for key in ("metrics_config",):
        if key in props and not Path(props[key]).is_absolute():
            props[key] = str(REPO / props[key])
    if "vmargs" in props:  # -Dlog4j.configurationFile=serving/log4j2.xml
        props["vmargs"] = re.sub(
            r"(-Dlog4j2?\.configurationFile=)(?!/)(\S+)", lambda m: m.group(1) + str(REPO / m.group(2)), props["vmargs"]
        )
    text = f"# rendered from {base} by serving.server\n" + "".join(f"{k}={v}\n" for k, v in props.items())
    atomic_write_text(out, text)
    return props


def grpc_address(props: dict[str, str]) -> str:
    """host:port of the gRPC inference service a config names (TorchServe's keys, read by both runtimes)."""
    return f"{props.get('grpc_inference_address', '127.0.0.1')}:{props.get('grpc_inference_port', 7070)}"


def management_url_for(inference_url: str, config: str | os.PathLike = DEFAULT_CONFIG) -> str:
    """The management API beside an inference URL: the same scheme and host, the port of ``config``'s
    management_address (TorchServe's; 8081 in serving/config.properties)."""
    parts = urllib.parse.urlsplit(inference_url if "://" in inference_url else f"http://{inference_url}")
    port = urllib.parse.urlsplit(read_properties(config)["management_address"]).port
    return f"{parts.scheme}://{parts.hostname}:{port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(url: str) -> bool:
    host, port = url.split("://", 1)[-1].rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", int(port))) == 0


@dataclass(frozen=True)
class Server:
    """A started server: its runtime, addresses, work directory, process-group id and token (if any).

    ``management_url`` is None for the oip runtime, which has no management API.
    """

    workdir: Path
    pid: int
    inference_url: str
    management_url: str | None
    metrics_url: str
    token_auth: bool
    model_log_offset: int = 0  # bytes of logs/model_log.log written by earlier runs in this workdir
    runtime: str = "torchserve"
    grpc_address: str = ""  # host:port of the gRPC inference service

    @classmethod
    def from_config(
        cls, workdir: Path, pid: int, props: dict[str, str], model_log_offset: int = 0, runtime: str = "torchserve"
    ) -> Server:
        return cls(
            Path(workdir),
            pid,
            props["inference_address"],
            props["management_address"] if runtime == "torchserve" else None,
            props["metrics_address"],
            props.get("disable_token_authorization", "false") != "true",
            model_log_offset,
            runtime,
            grpc_address(props),
        )

    @property
    def log_file(self) -> Path:
        return self.workdir / LOG_FILES[self.runtime]

    def local(self, url: str) -> str:
        return url.replace("://0.0.0.0", "://127.0.0.1")

    def token(self, kind: str = "inference") -> str | None:
        """The bearer token TorchServe generated (``key_file.json``), or None without token auth or
        before TorchServe has written it."""
        return read_key(self.workdir / KEY_FILE, kind) if self.token_auth else None


def read_key(path: str | os.PathLike, kind: str = "inference") -> str | None:
    """One key ("inference" or "management") from TorchServe's ``key_file.json``; None while the file
    is missing or still being written: TorchServe creates it empty and fills it afterwards, so a
    reader during start-up can find an empty or partial file."""
    try:
        return json.loads(Path(path).read_text())[kind]["key"]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------------
# start / ready / stop
# --------------------------------------------------------------------------------------------------
def start_server(
    model_store: str | os.PathLike,
    models: list[str],
    workdir: str | os.PathLike,
    config: str | os.PathLike = DEFAULT_CONFIG,
    overrides: dict[str, str] | None = None,
    runtime: str = "torchserve",
) -> Server:
    """Launch ``runtime`` in the background serving ``<model_store>/<name>.mar`` as ``name``.

    Returns at once; call ``wait_ready`` next. Raises ServerBusyError if one is already running in
    ``workdir`` or a port is taken.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    workdir = Path(workdir).resolve()
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    if running_pid(workdir) is not None:
        raise ServerBusyError(
            f"a server started from {workdir} is already running (pid {running_pid(workdir)}); stop it first: make stop"
        )
    store = Path(model_store).resolve()
    # The only URL TorchServe may "download": a .mar already in this store (see config.properties).
    # (\\Q..\\E quotes the path in the regex; the doubled backslash survives Java's .properties reader)
    store_only = {"allowed_urls": f"file://\\\\Q{store}\\\\E/[A-Za-z0-9_.-]+[.]mar"}
    props = render_config(config, workdir / CONFIG_FILE, {**store_only, **(overrides or {})})
    listeners = {
        "inference_address": props["inference_address"],
        "metrics_address": props["metrics_address"],
        "grpc_inference_port": f"http://{grpc_address(props)}",
    }
    if runtime == "torchserve":
        listeners.update(
            management_address=props["management_address"],
            grpc_management_port=(
                f"http://{props.get('grpc_management_address', '127.0.0.1')}:{props.get('grpc_management_port', 7071)}"
            ),
        )
    for key, url in listeners.items():
        if port_in_use(url):
            raise ServerBusyError(
                f"{key} {url} is already in use; stop what listens there (make stop) or change it in {config}"
            )
    (workdir / KEY_FILE).unlink(missing_ok=True)
    model_log = workdir / "logs" / "model_log.log"  # log4j appends across runs
    offset = model_log.stat().st_size if model_log.is_file() else 0
    token = props.get("disable_token_authorization", "false") != "true"
    if runtime == "torchserve":
        torchserve = Path(sys.executable).parent / "torchserve"
        cmd = [
            str(torchserve),
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(workdir / CONFIG_FILE),
            "--model-store",
            str(store),
            "--models",
            *[f"{m}={m}.mar" for m in models],
        ]
        env = {
            **java_env(),  # JAVA_HOME: the user's, else the venv's Java 17 (serving/java.py)
            # TorchServe's pid file and the unpacked archives go to the temp dir; keep them ours so
            # that parallel servers (tests, make serve) never see each other.
            "TMPDIR": str(workdir / "tmp"),
            "TEMP": str(workdir / "tmp"),
            "LOG_LOCATION": str(workdir / "logs"),
            "METRICS_LOCATION": str(workdir / "logs"),
        }
    else:
        hostport = lambda url: url.split("://", 1)[-1]  # noqa: E731
        cmd = [
            sys.executable,
            "-m",
            "serving.oip",
            "--model-store",
            str(store),
            "--models",
            *models,
            "--http",
            hostport(props["inference_address"]),
            "--metrics",
            hostport(props["metrics_address"]),
            "--grpc",
            grpc_address(props),
            "--workdir",
            str(workdir),
            "--max-request-bytes",
            props.get("max_request_size", str(16 * 2**20)),
            *(["--token"] if token else []),
        ]
        env = dict(os.environ)
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    with open(workdir / LOG_FILES[runtime], "ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    atomic_write_text(workdir / PID_FILE, str(proc.pid))
    return Server.from_config(workdir, proc.pid, props, offset, runtime)


def running_pid(workdir: str | os.PathLike) -> int | None:
    path = Path(workdir) / PID_FILE
    if not path.is_file():
        return None
    try:
        pid = int(path.read_text().strip())
        os.killpg(pid, 0)
        return pid
    except (ValueError, ProcessLookupError, PermissionError):
        return None


def stop_server(workdir: str | os.PathLike, timeout: float = 30.0) -> bool:
    """Stop the TorchServe started from ``workdir`` (its whole process group). False if none ran."""
    workdir = Path(workdir)
    pid = running_pid(workdir)
    (workdir / PID_FILE).unlink(missing_ok=True)
    if pid is None:
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(ChildProcessError):  # reap our own child if it is one, so the group can go
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    (workdir / KEY_FILE).unlink(missing_ok=True)
    return True


def warmup_image() -> bytes:
    """A real PNG (a bright bar on black) every model can decode and classify."""
    img = Image.new("L", (32, 32), 0)
    img.paste(255, (12, 6, 18, 26))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def wait_ready(server: Server, models: list[str], timeout: float = 180.0) -> dict[str, dict]:
    """Block until ``/ping`` answers and every model returned a real prediction for a PNG.

    Returns each model's warm-up response. Raises ServerError (with the log's tail) when the server
    exits, a model answers with an error other than "not ready yet", or ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    base = server.local(server.inference_url)
    answers: dict[str, dict] = {}
    image = warmup_image()
    last = "no answer yet"
    while time.monotonic() < deadline:
        if running_pid(server.workdir) is None:
            raise ServerError(f"{server.runtime} exited during start-up; last log lines:\n{log_tail(server)}")
        fatal = fatal_load_error(server)
        if fatal:  # TorchServe would restart the worker forever; a bad artifact will not heal
            raise ServerError(f"a model failed to load: {fatal}; log tail:\n{log_tail(server)}")
        for model in [m for m in models if m not in answers]:
            headers = {"Content-Type": "image/png"}
            token = server.token()
            if server.token_auth and token is None:  # posting without it would be refused with 401
                last = f"{server.workdir / KEY_FILE} not written yet"
                break
            if token:
                headers["Authorization"] = f"Bearer {token}"
            try:
                answer = httpclient.request("POST", f"{base}/predictions/{model}", image, headers, timeout=30)
            except NoAnswer as e:
                last = f"{model}: {e}"
                continue
            if answer.status == 200:
                answers[model] = json.loads(answer.body)
            elif answer.status in (404, 503):  # model not registered yet / no worker up yet
                last = f"{model}: HTTP {answer.status} {answer.body[:200]!r}"
            else:
                cause = fatal_load_error(server)
                raise ServerError(
                    f"warm-up of {model} answered HTTP {answer.status} "
                    f"({cause or answer.body[:300]!r}); log tail:\n{log_tail(server)}"
                )
        if len(answers) == len(models) and all_workers_up(server):
            return answers
        time.sleep(0.5)
    raise ServerError(f"{server.runtime} not ready after {timeout:.0f} s ({last}); log tail:\n{log_tail(server)}")


def all_workers_up(server: Server) -> bool:
    """oip: every worker serves (each binds the port once its models are loaded, so a warm-up answer
    means one of them is up). TorchServe: the warm-up answers are the test."""
    if server.runtime != "oip":
        return True
    try:
        doc = json.loads((server.workdir / "workers.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(doc["workers"]) and all(w["ready"] for w in doc["workers"])


FATAL_LOAD_ERRORS = ("IntegrityError", "SelfCheckError", "ModuleNotFoundError", "ImportError")


def fatal_load_error(server: Server) -> str | None:
    """The worker-log line naming an error no restart can fix (tampered file, missing module)."""
    path = server.workdir / "logs" / "model_log.log"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(server.model_log_offset)
        text = f.read().decode(errors="replace")
    hits = [line for line in text.splitlines() if any(f"{e}:" in line for e in FATAL_LOAD_ERRORS)]
    # the last one: a re-raised error with context follows the one it wraps in a traceback
    return hits[-1].split("MODEL_LOG - ", 1)[-1].strip() if hits else None


def log_tail(server: Server, lines: int = 30) -> str:
    return "\n".join(
        f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        for path in (server.log_file, server.workdir / "logs" / "model_log.log")
        if path.is_file()
    )


def curl_examples(server: Server, models: list[str]) -> str:
    """Ready-to-paste commands for the running server."""
    base = server.local(server.inference_url)
    auth = ""
    lines = []
    if server.token_auth:
        key = server.workdir / KEY_FILE
        lines.append(f'TOKEN=$(python3 -c \'import json;print(json.load(open("{key}"))["inference"]["key"])\')')
        auth = ' -H "Authorization: Bearer $TOKEN"'
    # Files that exist: make demo / make export write samples/<RUN>/<label>.png (held-out images) and
    # samples/photos/ (export.samples). The base64 bodies are streamed through a pipe (--data-binary @-):
    # a photo's base64 in one shell argument passes the kernel's 128 KiB limit ("Argument list too long").
    photo = Path("samples/photos/china.jpg")
    python = os.path.relpath(sys.executable) if Path(sys.executable).is_relative_to(Path.cwd()) else sys.executable
    for i, m in enumerate(models):
        pngs = sorted(Path("samples", m).glob("*.png"))
        if not pngs:
            lines.append(f"# no samples/{m}/ to post: make export RUN={m} writes one held-out image per class")
            continue
        a, b = pngs[0], pngs[min(1, len(pngs) - 1)]
        lines.append(f"curl{auth} {base}/predictions/{m} -T {a}")
        if i:  # the other forms once, for the first model
            continue
        lines += [
            f"curl{auth} {base}/predictions/{m} -F file0=@{a} -F file1=@{b}   # several images, one request",
            *(
                [
                    (
                        f"curl{auth} {base}/predictions/{m} -T {photo} -H 'X-Min-Confidence: 0.9'   "
                        f'# a photo, not what it learned: "abstain": [true]'
                    )
                ]
                if photo.is_file()
                else []
            ),
            (
                f'{{ printf \'{{"instances": [{{"b64": "\'; base64 -w0 {photo if photo.is_file() else a}; '
                f"printf '\"}}]}}'; }} | curl{auth} {base}/predictions/{m} -H 'X-TopK: 3' "
                f"-H 'Content-Type: application/json' --data-binary @-"
            ),
            (
                f'{{ printf \'{{"inputs": [{{"name": "images", "shape": [1], "datatype": "BYTES", '
                f'"data": ["\'; base64 -w0 {a}; printf \'"]}}]}}\'; }} | curl{auth} {base}/v2/models/{m}/infer '
                f"-H 'Content-Type: application/json' --data-binary @-"
            ),
            f"{python} -m serving.client predict --run {m} {a} {b}",
        ]
    if server.management_url is None:  # the oip runtime: no management API; OIP metadata and gRPC instead
        lines += [
            f"curl{auth} {base}/v2/models/{models[0]}          # Open Inference Protocol model metadata",
            f"# gRPC (inference.GRPCInferenceService) on {server.grpc_address}",
            f"curl {server.local(server.metrics_url)}/metrics         # Prometheus",
        ]
        return "\n".join(lines)
    lines += [
        f"curl {server.local(server.management_url)}/models          # management (loopback only)",
        f"curl {server.local(server.metrics_url)}/metrics         # Prometheus",
    ]
    if server.token_auth:
        read = f'import json;print(json.load(open("{server.workdir / KEY_FILE}"))["management"]["key"])'
        lines[-2] = lines[-2].replace("curl ", f"curl -H \"Authorization: Bearer $(python3 -c '{read}')\" ")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# workers: which processes serve a model, and whether one died (either runtime)
# --------------------------------------------------------------------------------------------------
# TorchServe's frontend log lines when a worker dies or is restarted; the oip supervisor's one line.
DEATH_MARKS = {
    "torchserve": ("Worker disconnected", "died", "Auto recovery", "Retry worker"),
    "oip": ("died with code",),
}
DEATH_LOGS = {"torchserve": ("logs", "ts_log.log"), "oip": (LOG_FILES["oip"],)}


def worker_pids(server: Server, model: str, token: str | None = None) -> list[tuple]:
    """(id, pid, start time) of each worker process serving ``model``: a restart changes them.

    TorchServe: its management API (``token``: the management key when token auth is on). oip: the
    supervisor's ``workers.json`` (every worker serves every model).
    """
    if server.management_url is None:  # the oip runtime: no management API
        doc = json.loads((server.workdir / "workers.json").read_text())
        return sorted((w["slot"], w["pid"], w["started"]) for w in doc["workers"])
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = httpclient.request("GET", f"{server.local(server.management_url)}/models/{model}", headers=headers)
    if answer.status != 200:
        raise ServerError(f"describe {model}: HTTP {answer.status} {answer.body[:200]!r}")
    return sorted((w["id"], w.get("pid"), w["startTime"]) for w in json.loads(answer.body)[0]["workers"])


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and all its descendants (a server's frontend and workers);
    0 once it is gone."""
    import psutil  # torchserve's dependency: present wherever a server runs

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def worker_deaths(server: Server) -> list[str]:
    """The log lines that report a worker dying or being restarted, since the server's work dir began."""
    path = server.workdir.joinpath(*DEATH_LOGS[server.runtime])
    text = path.read_text(errors="replace") if path.is_file() else ""
    return [line for line in text.splitlines() if any(m in line for m in DEATH_MARKS[server.runtime])]
