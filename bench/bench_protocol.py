"""Protocol conformance of both runtimes, side by side: standard OIP clients, pipelining, Connection: close.

    python bench/bench_protocol.py [--run digits] [--pipelined 2000]

Serves ``artifacts/<RUN>``'s archive on TorchServe and on the oip runtime (private ports) and, on each:

  * calls every Open Inference Protocol operation with ``tritonclient.http`` and ``tritonclient.grpc``,
    unmodified (health, metadata, model ready, infer with BYTES images and UINT8 pixels, as JSON and
    with the binary extension over HTTP, raw over gRPC, a typed error), counting the calls that pass;
  * pipelines ``--pipelined`` requests on keep-alive connections (one write of 50 each), every request with
    its own ``X-TopK`` (1..10), and counts the answers whose number of classes is not their request's
    (an answer paired with the wrong request);
  * checks that ``Connection: close`` is honoured (the answer says close and the socket is closed).

Writes reports/protocol.json and the ``protocol`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loadtest.docs import publish_report
from loadtest.images import load_pool
from loadtest.torchserve import PrivateServer
from export.runtime import read_manifest
from serving.archive import ArchiveConfig, build_archive
from training.contract import Contract
from training.images import open_image, to_array, to_contract
from training.machine import cpu_name

RUNTIMES = ("torchserve", "oip")


def to_contract_pixels(encoded: bytes, contract: Contract) -> np.ndarray:
    """An encoded image -> (C, H, W) uint8 at the contract (what a UINT8 v2 tensor carries)."""
    return to_array(to_contract(open_image(io.BytesIO(encoded)), contract))


def _read(f) -> tuple[int, dict, bytes]:
    line = f.readline()
    if not line:
        raise ConnectionError("closed")
    status = int(line.split()[1])
    headers = {}
    while (h := f.readline()) not in (b"\r\n", b""):
        k, v = h.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    return status, headers, f.read(int(headers.get("content-length", 0)))


def pipelined(url: str, model: str, image: bytes, total: int, depth: int = 50) -> dict:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    misplaced = answered = errors = 0
    for start in range(0, total, depth):
        topks = [1 + (start + i) % 10 for i in range(min(depth, total - start))]
        wire = b"".join(f"POST /predictions/{model} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                        f"X-TopK: {k}\r\nContent-Length: {len(image)}\r\n\r\n".encode() + image for k in topks)
        with socket.create_connection((host, int(port)), timeout=60) as s, s.makefile("rb") as f:
            s.sendall(wire)
            for k in topks:
                try:
                    status, _, body = _read(f)
                except (ConnectionError, TimeoutError, ValueError):
                    errors += 1
                    continue
                answered += 1
                if status != 200:
                    errors += 1
                elif len(json.loads(body)["predictions"][0]) != k:
                    misplaced += 1
    return {"requests": total, "answered": answered, "misplaced": misplaced, "errors": errors}


def connection_close(url: str, model: str, image: bytes) -> dict:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s, s.makefile("rb") as f:
        s.sendall(f"POST /predictions/{model} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: image/png\r\n"
                  f"Content-Length: {len(image)}\r\n\r\n".encode() + image)
        status, headers, _ = _read(f)
        s.settimeout(3)
        try:
            closed = f.read() == b""
        except TimeoutError:
            closed = False
    return {"status": status, "says_close": headers.get("connection") == "close", "socket_closed": closed}


def oip_calls(http_url: str, grpc_address: str, model: str, images: list[bytes], pixels: np.ndarray) -> dict:
    """{transport: {call: "pass" | error text}} for every OIP call, through tritonclient unmodified."""
    import base64

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    out: dict[str, dict[str, str]] = {}
    for transport, lib, address in (("http", httpclient, http_url.split("//", 1)[1]), ("grpc", grpcclient, grpc_address)):
        client = lib.InferenceServerClient(address)
        n = len(images)

        def infer(name, dtype, data, binary, shape, lib=lib, client=client):
            t = lib.InferInput(name, shape, dtype)
            if lib is httpclient:
                t.set_data_from_numpy(data, binary_data=binary)
            else:
                t.set_data_from_numpy(data)
            r = client.infer(model, [t])
            assert r.as_numpy("index").shape[0] == shape[0]

        def unknown_model_error(lib=lib, client=client):
            t = lib.InferInput("images", [1], "BYTES")
            t.set_data_from_numpy(np.array(images[:1], dtype=np.object_))
            try:
                client.infer(f"{model}-nope", [t])
            except InferenceServerException as e:
                assert e.message(), "an error without a message"
                return
            raise AssertionError("an unknown model was answered")

        b64 = np.array([base64.b64encode(x) for x in images], dtype=np.object_)
        raw = np.array(images, dtype=np.object_)
        calls = {
            "server live": lambda c=client: c.is_server_live() or (_ for _ in ()).throw(AssertionError("not live")),
            "server ready": lambda c=client: c.is_server_ready() or (_ for _ in ()).throw(AssertionError("not ready")),
            "server metadata": lambda c=client: c.get_server_metadata(),
            "model ready": lambda c=client: c.is_model_ready(model) or (_ for _ in ()).throw(AssertionError("not ready")),
            "model metadata": lambda c=client: c.get_model_metadata(model),
            "infer BYTES, binary": lambda: infer("images", "BYTES", raw, True, [n]),
            "infer UINT8, binary": lambda: infer("pixels", "UINT8", pixels, True, list(pixels.shape)),
            "typed error (unknown model)": unknown_model_error,
        }
        if lib is httpclient:  # JSON bodies exist over HTTP only (gRPC always carries raw tensor bytes)
            calls.update({"infer BYTES, JSON (base64)": lambda: infer("images", "BYTES", b64, False, [n]),
                          "infer UINT8, JSON": lambda: infer("pixels", "UINT8", pixels, False, list(pixels.shape))})
        results = {}
        for name, call in calls.items():
            try:
                call()
                results[name] = "pass"
            except Exception as e:  # noqa: BLE001 -- what failed, in a word, is the result
                results[name] = f"{type(e).__name__}: {str(e)[:120]}"
        out[transport] = results
        client.close()
    return out


def measure(runtime: str, store: Path, run: str, work: Path, images: list[bytes], pixels: np.ndarray,
            total: int) -> dict:
    with PrivateServer(store, [run], workdir=work / runtime, runtime=runtime) as srv:
        return {"pipelining": pipelined(srv.url, run, images[0], total),
                "connection_close": connection_close(srv.url, run, images[0]),
                "oip": oip_calls(srv.url, srv.server.grpc_address, run, images, pixels)}


def render(doc: dict) -> str:
    rows = ["| | " + " | ".join(RUNTIMES) + " |", "|---|" + "---|" * len(RUNTIMES)]
    r = doc["runtimes"]
    passed = {k: sum(v == "pass" for t in r[k]["oip"].values() for v in t.values()) for k in RUNTIMES}
    calls = sum(len(t) for t in r[RUNTIMES[0]]["oip"].values())
    rows.append("| OIP calls passing (tritonclient http + grpc) | " +
                " | ".join(f"{passed[k]} of {calls}" for k in RUNTIMES) + " |")
    rows.append("| pipelined answers paired with the wrong request | " +
                " | ".join(f"{r[k]['pipelining']['misplaced']} of {r[k]['pipelining']['requests']} "
                           f"({r[k]['pipelining']['errors']} errors)" for k in RUNTIMES) + " |")
    rows.append("| `Connection: close` honoured | " +
                " | ".join("yes" if r[k]["connection_close"]["says_close"] and r[k]["connection_close"]["socket_closed"]
                           else f"no ({r[k]['connection_close']})" for k in RUNTIMES) + " |")
    failing = [f"- {k} {t} `{c}`: {v}" for k in RUNTIMES for t, calls_ in r[k]["oip"].items()
               for c, v in calls_.items() if v != "pass"]
    return "\n".join([
        "## Protocol conformance, both runtimes (`python bench/bench_protocol.py`)", "",
        f"Command: `{doc['command']}`, {doc['started']}, on {doc['machine']}. Model `{doc['run']}`; "
        f"pipelining: {doc['pipelined']} requests, 50 per connection in one write, each with its own X-TopK.", "",
        *rows, "", "Calls that failed:" if failing else "Every call passed on both runtimes.", *failing])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="digits")
    p.add_argument("--artifacts-dir", default="artifacts")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--pipelined", type=int, default=2000)
    p.add_argument("--reports", default="reports")
    p.add_argument("--docs", default="docs/benchmarks.md", help="'' to skip the docs update")
    a = p.parse_args(argv)
    if not (Path(a.artifacts_dir) / a.run / "manifest.json").is_file():
        raise SystemExit(f"error: {a.artifacts_dir}/{a.run} is not exported; make export RUN={a.run} first")
    pool = load_pool(a.run, limit=4, artifacts_dir=Path(a.artifacts_dir), runs_dir=Path(a.runs_dir))
    images = list(pool.images)
    contract = Contract.from_dict(read_manifest(Path(a.artifacts_dir) / a.run)["contract"])
    pixels = np.stack([to_contract_pixels(b, contract) for b in images])
    doc = {"command": "python bench/bench_protocol.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_name(), "run": a.run,
           "pipelined": a.pipelined, "runtimes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-protocol-") as tmp:
        store = Path(tmp) / "store"
        build_archive(ArchiveConfig(run=a.run, artifacts_dir=a.artifacts_dir, model_store=str(store)), log=lambda _m: None)
        for runtime in RUNTIMES:
            doc["runtimes"][runtime] = measure(runtime, store, a.run, Path(tmp), images, pixels, a.pipelined)
            print(runtime, json.dumps(doc["runtimes"][runtime]["pipelining"]), flush=True)
    section = render(doc)
    publish_report(Path(a.reports), "protocol", doc, section, Path(a.docs) if a.docs else None, "protocol")
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
