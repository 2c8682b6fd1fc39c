"""Our oip runtime against the maintained Open Inference Protocol servers, side by side in one run.

    python bench/bench_oip_peers.py --kserve-venv .venv-kserve --mlserver-venv .venv-mlserver [--run digits]

A runtime of our own is worth keeping only where it does better than the maintained ones it could be
replaced by: KServe's Python ``ModelServer`` and Seldon MLServer. Each peer serves the same exported run through ``bench/peers/`` (a few lines of protocol
glue around ``serving.core``, the code our handler runs), in its own virtualenv, because both pin their
own fastapi/uvicorn/grpcio/pydantic:

    python3 -m venv .venv-kserve && .venv-kserve/bin/pip install kserve numpy pillow onnxruntime torch==2.13.0
    .venv-kserve/bin/pip install --no-deps -e .        # and the same with mlserver in .venv-mlserver, plus
    .venv-mlserver/bin/pip install uvloop==0.21.0      # (MLServer 1.7.1's parallel workers call
                                                       #  asyncio.get_event_loop(), which uvloop 0.23 refuses)

(torch is imported by the project's contract code, not run: the model is the ONNX variant.)

Every server is started once on free ports and kept up; then, ``--rotations`` times, each server in turn
gets ``--warmup`` s and then ``--duration`` s of ``wrk -t1 -c<connections>`` (closed loop), each request
one held-out digit: a PNG body on ``/predictions/<RUN>``, a v2 JSON body with one base64 BYTES input on
``/v2/models/<RUN>/infer`` (the one request form every server here accepts). The machine is shared:
every number carries the load average before it, and only ratios within one rotation compare.

Each number comes with the CPU seconds the server's processes used (psutil), so that servers with
different process counts compare per CPU-second as well as per second. Per server it also checks that
the answers' top-1 agree with the oip runtime's, HTTP/1.1 pipelining (50 v2 requests in one write, each
its own id and image: answers paired with the wrong request), and the Open Inference Protocol calls of
``tritonclient`` (HTTP and gRPC, unmodified; bench_protocol.py's).

Writes reports/oip_peers.json and the ``oip-peers`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_protocol import _read, oip_calls, to_contract_pixels

from export.runtime import read_manifest
from loadtest.docs import publish_report
from loadtest.images import load_pool
from loadtest.torchserve import PrivateServer
from loadtest.wrk import WRK_SCRIPT, run_wrk
from serving.archive import ArchiveConfig, build_archive
from serving.httpclient import NoAnswer, request
from serving.server import free_port, running_pid, tree_cpu_s
from training.contract import Contract
from training.machine import cpu_name

PEERS = Path(__file__).resolve().parent / "peers"
REPO = PEERS.parent.parent
V2_JSON = "application/json"


@dataclass
class Server:
    """One running server: its HTTP base URL, gRPC address, and the process to stop (None: a PrivateServer)."""

    name: str
    http_url: str
    grpc: str
    proc: subprocess.Popen | None = None
    log: Path | None = None
    setting: str = ""
    pid: int = 0  # the process whose tree's CPU time is the server's

    def __post_init__(self) -> None:
        self.pid = self.pid or self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the workers it forked
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass(frozen=True)
class Target:
    """One row of the throughput table: a server, a route and the body kind posted to it."""

    server: str
    path: str
    body: str  # "png" (raw image bytes) or "v2" (v2 JSON, one base64 BYTES input)

    @property
    def label(self) -> str:
        return f"{self.server} {self.path.split('/')[1] if self.path.startswith('/predictions') else 'v2'}"


def v2_body(png: bytes, request_id: str | None = None) -> bytes:
    doc = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]}]}
    if request_id is not None:
        doc["id"] = request_id
    return json.dumps(doc).encode()


def wait_answering(srv: Server, model: str, png: bytes, timeout_s: float = 240.0) -> None:
    """Poll until the server answers a real v2 inference with 200 (or its process died)."""
    deadline, last = time.monotonic() + timeout_s, "no answer yet"
    while time.monotonic() < deadline:
        if srv.proc is not None and srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.name} exited ({srv.proc.returncode}); log tail:\n{srv.log.read_text()[-2000:]}")
        try:
            answer = request("POST", f"{srv.http_url}/v2/models/{model}/infer", v2_body(png),
                             {"Content-Type": V2_JSON}, timeout=10)
            if answer.status == 200:
                return
            last = f"HTTP {answer.status} {answer.body[:200]!r}"
        except NoAnswer as e:
            last = str(e)
        time.sleep(0.5)
    raise RuntimeError(f"{srv.name} did not answer within {timeout_s:.0f} s: {last}")


def spawn(name: str, argv: list[str], env: dict, work: Path, setting: str, http_port: int, grpc_port: int) -> Server:
    log = work / f"{name}.log"
    proc = subprocess.Popen(argv, cwd=PEERS, env={**os.environ, **env}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", proc, log, setting)


def start_kserve(venv: Path, artifact: Path, model: str, work: Path, workers: int) -> Server:
    http_port, grpc_port = free_port(), free_port()
    argv = [str(venv / "bin/python"), "kserve_model.py", "--model_name", model, "--http_port", str(http_port),
            "--grpc_port", str(grpc_port), "--workers", str(workers), "--enable_latency_logging", "false",
            "--enable_docs_url", "false", "--log_config_file", str(PEERS / "quiet_logging.json")]
    return spawn("kserve", argv, {"PEER_ARTIFACT": str(artifact)}, work,
                 f"ModelServer, {workers} workers, latency and access logging off, no batching (it has none)",
                 http_port, grpc_port)


def start_mlserver(venv: Path, artifact: Path, model: str, work: Path, parallel_workers: int) -> Server:
    http_port, grpc_port = free_port(), free_port()
    settings = json.loads((PEERS / "model-settings.json").read_text())
    env = {"PEER_ARTIFACT": str(artifact), "MLSERVER_HTTP_PORT": str(http_port), "MLSERVER_GRPC_PORT": str(grpc_port),
           "MLSERVER_METRICS_PORT": str(free_port()), "MLSERVER_PARALLEL_WORKERS": str(parallel_workers),
           "MLSERVER_MODEL_NAME": model, "MLSERVER_DEBUG": "false", "MLSERVER_LOGGING_LEVEL": "WARNING"}
    argv = [str(venv / "bin/mlserver"), "start", str(PEERS)]
    return spawn(f"mlserver-pw{parallel_workers}", argv, env, work,
                 f"adaptive batching max_batch_size {settings['max_batch_size']}, max_batch_time "
                 f"{settings['max_batch_time']} s, parallel_workers {parallel_workers}", http_port, grpc_port)


def package_version(venv: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run([str(venv / "bin/python"), "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def write_bodies(images: list[bytes], out: Path) -> dict[str, list[Path]]:
    """wrk reads each body from a file: the PNG itself, and its v2 JSON request."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {"png": [], "v2": []}
    for i, png in enumerate(images):
        for kind, data in (("png", png), ("v2", v2_body(png))):
            p = out / f"{i:03d}.{kind}"
            p.write_bytes(data)
            files[kind].append(p)
    return files


def wrk_scripts(work: Path) -> dict[str, Path]:
    """loadtest/wrk.py's script, posting each body kind with its content type."""
    scripts = {"png": work / "png.lua", "v2": work / "v2.lua"}
    scripts["png"].write_text(WRK_SCRIPT)
    scripts["v2"].write_text(WRK_SCRIPT.replace('"application/octet-stream"', f'"{V2_JSON}"'))
    assert scripts["v2"].read_text() != WRK_SCRIPT, "loadtest/wrk.py's content type moved; update wrk_scripts"
    return scripts


def pipelined_v2(url: str, model: str, images: list[bytes], total: int, depth: int = 50) -> dict:
    """``total`` v2 requests, ``depth`` per connection in one write, each with its own id and image:
    counts answers whose id (or top-1 for its image) is not their request's."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    misplaced = answered = errors = 0
    for start in range(0, total, depth):
        ids = [f"r{start + i}" for i in range(min(depth, total - start))]
        bodies = [v2_body(images[(start + i) % len(images)], rid) for i, rid in enumerate(ids)]
        wire = b"".join(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: {V2_JSON}\r\n"
                        f"Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies)
        with socket.create_connection((host, int(port)), timeout=60) as s, s.makefile("rb") as f:
            s.sendall(wire)
            for rid in ids:
                try:
                    status, _, body = _read(f)
                except (ConnectionError, TimeoutError, ValueError, IndexError):
                    errors += 1
                    break  # the connection is gone: the rest of this write is unanswered
                answered += 1
                if status != 200:
                    errors += 1
                elif json.loads(body).get("id") != rid:
                    misplaced += 1
    return {"requests": total, "answered": answered, "misplaced": misplaced, "errors": errors}


def top1(srv: Server, model: str, images: list[bytes]) -> list[int | None]:
    """Each image's top-1 class index from the server's v2 answer (None for a non-200)."""
    out = []
    for png in images:
        answer = request("POST", f"{srv.http_url}/v2/models/{model}/infer", v2_body(png),
                         {"Content-Type": V2_JSON}, timeout=30)
        index = next((o for o in json.loads(answer.body).get("outputs", []) if o["name"] == "index"), None)
        out.append(int(np.asarray(index["data"]).reshape(index["shape"])[0][0])
                   if answer.status == 200 and index else None)
    return out


def measure(target: Target, srv: Server, files: dict, scripts: dict, connections: int, warmup_s: float,
            duration_s: float) -> dict:
    url = srv.http_url + target.path
    run_wrk(url, files[target.body], connections, warmup_s, scripts[target.body])
    load, cpu = os.getloadavg(), tree_cpu_s(srv.pid)
    r = run_wrk(url, files[target.body], connections, duration_s, scripts[target.body])
    cpu = tree_cpu_s(srv.pid) - cpu
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return {"target": target.label, "path": target.path, "body": target.body,
            "req_s": round(r["requests"] / (r["duration_us"] / 1e6), 1), "p50_ms": r["p50_us"] / 1e3,
            "p99_ms": r["p99_us"] / 1e3, "errors": errors, "server_cpu_s": round(cpu, 2),
            "req_per_cpu_s": round(r["requests"] / cpu, 1), "loadavg_before": [round(x, 2) for x in load],
            "wrk_cpu_s": round(r["cpu_s"], 2)}


PEER_NOTES = (
    ("- KServe `--workers` > 1 spawns each HTTP worker and kills one that misses a 5 s liveness ping from its "
    "start; on these 2 busy cores the spawn's imports alone took longer (`import kserve` 7.7 s) and workers "
    "were respawned forever, so KServe ran 1 process (no batching: its Python server has none). On a shared "
    "machine a 1-process server also gets a smaller share of the cores than a 2-process one: the req/s of "
    "kserve and mlserver-pw0 are a lower bound; their requests per CPU-second are not."),
    ("- `tritonclient.http` sends its JSON bodies without a Content-Type; KServe then reads the body as bytes "
    "and asks for `Inference-Header-Content-Length`, so unmodified JSON infers fail; its binary BYTES path "
    "fails to encode a PNG's bytes."),
    ("- MLServer has no binary tensor extension over HTTP (422 for tritonclient's binary bodies); its parallel "
    "workers need uvloop 0.21 (0.23 refuses `asyncio.get_event_loop()` in them)."),
)


def ratio_to(rotation: list[dict], base: str, key: str = "req_s") -> dict[str, float]:
    """Each target's ``key`` over the baseline's, within one rotation."""
    ref = next(m[key] for m in rotation if m["target"] == base)
    return {m["target"]: m[key] / ref for m in rotation}


def render(doc: dict) -> str:
    base, c = doc["baseline"], doc["checks"]
    lines = [
        "## Open Inference Protocol servers: ours against KServe and MLServer (`python bench/bench_oip_peers.py`)",
        "",
        (f"Command: `{doc['command']}`, {doc['started']}, on {doc['machine']}. Model `{doc['run']}` "
         f"({doc['variant']}), {doc['images']} held-out digits; `wrk -t1 -c{doc['connections']}`, "
         f"{doc['warmup_s']:g} s warm-up then {doc['duration_s']:g} s, closed loop, all servers up at once on "
         f"free ports, measured one at a time. **The machine is shared**: the load average (1 min) before each "
         f"number is given, and only ratios within one rotation compare (to `{base}`)."),
        "",
        "Servers: " + "; ".join(f"**{k}**: {v}" for k, v in doc["settings"].items()) + ". Versions: "
        + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".",
        "",
        (f"| rotation | target | body | req/s | p50 ms | p99 ms | errors | req/s / {base} | requests per server "
         f"CPU-s | that / {base} | load 1 min |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, rot in enumerate(doc["rotations"], 1):
        ratios, per_cpu = ratio_to(rot, base), ratio_to(rot, base, "req_per_cpu_s")
        lines.extend(f"| {i} | {m['target']} | {m['body']} | {m['req_s']:,.0f} | {m['p50_ms']:.1f} | "
                     f"{m['p99_ms']:.1f} | {m['errors']} | {ratios[m['target']]:.2f} | {m['req_per_cpu_s']:,.0f} | "
                     f"{per_cpu[m['target']]:.2f} | {m['loadavg_before'][0]:.1f} |" for m in rot)
    targets = [m["target"] for m in doc["rotations"][0]]
    for key, what in (("req_s", "req/s"), ("req_per_cpu_s", "requests per server CPU-second")):
        medians = {t: float(np.median([ratio_to(rot, base, key)[t] for rot in doc["rotations"]])) for t in targets}
        lines += ["", f"Median over the rotations, {what} / `{base}`'s: "
                  + ", ".join(f"{t} **{r:.2f}**" for t, r in medians.items()) + "."]
    lines += ["", ("Requests per server CPU-second (the server's processes and their children, from psutil) "
                   "compares servers with different process counts on a shared machine, where throughput alone "
                   "also measures the share of the cores each one got.")]
    names = list(c)
    lines += ["", "| check | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
              "| top-1 agrees with oip (v2, same images) | "
              + " | ".join(f"{c[n]['top1_agree']} of {c[n]['top1_total']}" for n in names) + " |",
              "| pipelined answers paired with the wrong request | "
              + " | ".join(f"{c[n]['pipelining']['misplaced']} of {c[n]['pipelining']['requests']} "
                           f"({c[n]['pipelining']['errors']} errors)" for n in names) + " |"]
    lines.extend(f"| tritonclient.{t} calls passing | "
                 + " | ".join(f"{sum(v == 'pass' for v in c[n]['oip'][t].values())} of {len(c[n]['oip'][t])}"
                              for n in names) + " |" for t in ("http", "grpc"))
    failing = [f"- {n} {t} `{call}`: {v.splitlines()[0]}" for n in names for t, calls in c[n]["oip"].items()
               for call, v in calls.items() if v != "pass"]
    lines += ["", "tritonclient calls that failed:" if failing else "Every tritonclient call passed on every server.",
              *failing, "", "Why, as read in the peers' code ("
              + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "):",
              *PEER_NOTES]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("peers")
    g.add_argument("--kserve-venv", type=Path, required=True,
                   help="virtualenv with kserve and this project (--no-deps -e)")
    g.add_argument("--mlserver-venv", type=Path, required=True, help="virtualenv with mlserver and this project")
    g.add_argument("--mlserver-parallel-workers", type=int, nargs="+", default=[2, 0],
                   help="one MLServer per value: its inference processes (0: inference in the HTTP process; "
                        "oip runs the archive's maxWorkers, 2)")
    g.add_argument("--kserve-workers", type=int, default=1,
                   help="KServe --workers. Above 1 KServe spawns each HTTP worker and kills one that does not "
                        "answer its liveness ping within 5 s; importing kserve alone took 7.7 s here on 2 "
                        "busy cores, so its workers were respawned forever: 1 is what starts here")
    g = p.add_argument_group("load")
    g.add_argument("--connections", type=int, default=16)
    g.add_argument("--warmup", type=float, default=3.0, help="seconds of wrk before each measured run")
    g.add_argument("--duration", type=float, default=10.0, help="seconds of each measured run")
    g.add_argument("--rotations", type=int, default=3, help="times every target is measured, in turn")
    g.add_argument("--pipelined", type=int, default=200, help="pipelined v2 requests per server (50 per write)")
    g = p.add_argument_group("model and output")
    g.add_argument("--run", default="digits")
    g.add_argument("--artifacts-dir", default="artifacts")
    g.add_argument("--runs-dir", default="runs")
    g.add_argument("--reports", default="reports")
    g.add_argument("--docs", default="docs/benchmarks.md", help="'' to skip the docs update")
    a = p.parse_args(argv)
    a.kserve_venv, a.mlserver_venv = a.kserve_venv.absolute(), a.mlserver_venv.absolute()  # servers run in bench/peers
    for flag, venv, exe in (("--kserve-venv", a.kserve_venv, "python"),
                            ("--mlserver-venv", a.mlserver_venv, "mlserver")):
        if not (venv / "bin" / exe).is_file():
            raise SystemExit(f"error: {flag} {venv} has no bin/{exe}; build it as this script's docstring says")
    if not (Path(a.artifacts_dir) / a.run / "manifest.json").is_file():
        raise SystemExit(f"error: {a.artifacts_dir}/{a.run} is not exported; make export RUN={a.run} first")
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk not found; apt-get install -y wrk")

    pool = load_pool(a.run, limit=128, artifacts_dir=Path(a.artifacts_dir), runs_dir=Path(a.runs_dir))
    images = list(pool.images)
    contract = Contract.from_dict(read_manifest(Path(a.artifacts_dir) / a.run)["contract"])
    pixels = np.stack([to_contract_pixels(b, contract) for b in images[:4]])
    doc = {"command": "python bench/bench_oip_peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_name(), "run": a.run,
           "images": len(images), "image_source": pool.source, "connections": a.connections, "warmup_s": a.warmup,
           "duration_s": a.duration, "versions": {}, "settings": {}, "rotations": [], "checks": {}}
    with tempfile.TemporaryDirectory(prefix="bench-oip-peers-") as tmp:
        work = Path(tmp)
        # one snapshot of the run for every server (another engineer may re-export artifacts/ meanwhile)
        artifact = work / "artifacts" / a.run
        shutil.copytree(Path(a.artifacts_dir) / a.run, artifact)
        doc["variant"] = read_manifest(artifact)["default_variant"]["cpu"]
        store = work / "store"
        build_archive(ArchiveConfig(run=a.run, artifacts_dir=str(work / "artifacts"), model_store=str(store)),
                      log=lambda _m: None)
        files, scripts = write_bodies(images, work / "bodies"), wrk_scripts(work)
        servers: dict[str, Server] = {}
        ours = PrivateServer(store, [a.run], workdir=work / "oip", runtime="oip")
        try:
            ours.start()
            servers["oip"] = Server("oip", ours.url, ours.server.grpc_address, pid=running_pid(ours.workdir),
                                    setting=f"`python -m serving.oip`, the archive's settings (batch "
                                            f"{ArchiveConfig.batch_size}, {ArchiveConfig.max_batch_delay_ms} ms, "
                                            f"{ArchiveConfig.max_workers} workers)")
            servers["kserve"] = start_kserve(a.kserve_venv, artifact, a.run, work, a.kserve_workers)
            for n in a.mlserver_parallel_workers:
                servers[f"mlserver-pw{n}"] = start_mlserver(a.mlserver_venv, artifact, a.run, work, n)
            for srv in servers.values():
                wait_answering(srv, a.run, images[0])
                doc["settings"][srv.name] = srv.setting
            for name, venv in (("kserve", a.kserve_venv), ("mlserver", a.mlserver_venv)):
                doc["versions"][name] = package_version(venv, name)
            targets = [Target("oip", f"/predictions/{a.run}", "png"), Target("oip", f"/v2/models/{a.run}/infer", "v2"),
                       Target("kserve", f"/v2/models/{a.run}/infer", "v2"),
                       *(Target(f"mlserver-pw{n}", f"/v2/models/{a.run}/infer", "v2")
                         for n in a.mlserver_parallel_workers)]
            doc["baseline"] = targets[1].label
            for i in range(a.rotations):
                rotation = []
                for t in targets:
                    m = measure(t, servers[t.server], files, scripts, a.connections, a.warmup, a.duration)
                    rotation.append(m)
                    print(f"rotation {i + 1} {m['target']:<16} {m['req_s']:8,.0f} req/s  p50 {m['p50_ms']:.1f} ms  "
                          f"p99 {m['p99_ms']:.1f} ms  errors {m['errors']}  load {m['loadavg_before'][0]:.1f}",
                          flush=True)
                doc["rotations"].append(rotation)
            reference = top1(servers["oip"], a.run, images[:32])
            for name, srv in servers.items():
                answers = reference if name == "oip" else top1(srv, a.run, images[:32])
                doc["checks"][name] = {
                    "top1_agree": sum(x == y is not None for x, y in zip(answers, reference, strict=True)),
                    "top1_total": len(reference),
                    "pipelining": pipelined_v2(srv.http_url, a.run, images, a.pipelined),
                    "oip": oip_calls(srv.http_url, srv.grpc, a.run, images[:4], pixels)}
                print(name, json.dumps(doc["checks"][name]["pipelining"]), flush=True)
        finally:
            for srv in servers.values():
                srv.stop()
            ours.stop()
    section = render(doc)
    publish_report(Path(a.reports), "oip_peers", doc, section, Path(a.docs) if a.docs else None, "oip-peers")
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
