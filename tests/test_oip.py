"""The oip runtime's own surface: the Open Inference Protocol with the standard clients, HTTP/1.1
correctness and bounds, a stock TorchServe handler's archive, and a drain on SIGTERM.

The shared suites (request forms, bad inputs, hostile traffic, observability) already run against both
runtimes through the parametrised ``served`` fixture; the tests here use its oip server (``oip``), or a
private oip server where they need other settings (short timeouts) or stop it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from served import LIMITS, auth_header, b64, post
from serving.client import heldout_digits
from serving.httpclient import request, wait_until_ok
from serving.server import free_port
from training.contract import Contract
from training.images import encode_png

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def oip(served):
    if served["runtime"] != "oip":
        pytest.skip("the oip runtime's own surface (TorchServe has no OIP health, metadata, gRPC service "
                    "or binary extension)")
    return served


def _digits(n: int, seed: int = 11) -> tuple[list[bytes], np.ndarray]:
    images, labels = heldout_digits(n, seed=seed)
    return [encode_png(x) for x in images], images


# --------------------------------------------------------------------------------------------------
# Open Inference Protocol with tritonclient, unmodified
# --------------------------------------------------------------------------------------------------
def test_tritonclient_http_every_call(oip):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    pngs, pixels = _digits(3)
    client = httpclient.InferenceServerClient(oip["url"].split("//", 1)[1])
    headers = auth_header(oip)
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata(headers=headers)["extensions"] == ["binary_tensor_data"]
    assert client.is_model_ready("digits", headers=headers)
    meta = client.get_model_metadata("digits", headers=headers)
    assert [i["datatype"] for i in meta["inputs"]] == ["BYTES", "UINT8"]
    contract = Contract.from_dict(oip["manifests"]["digits"]["contract"])
    assert meta["inputs"][1]["shape"] == [-1, *contract.input_shape]
    names = [o["name"] for o in meta["outputs"]]
    assert {"label", "index", "probability", "abstain"} <= set(names)

    answers = {}
    for binary_in in (False, True):  # JSON (base64 text: JSON carries no raw bytes) and the binary extension
        for binary_out in (False, True):
            images = httpclient.InferInput("images", [3], "BYTES")
            data = pngs if binary_in else [b64(p) for p in pngs]
            images.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary_in)
            outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("index", "probability")]
            result = client.infer("digits", [images], outputs=outputs, headers=headers, request_id="r-1")
            assert result.get_response()["id"] == "r-1"
            answers[(binary_in, binary_out)] = (result.as_numpy("index"), result.as_numpy("probability"))
    first = answers[(False, False)]
    assert first[0].shape == (3, 5)
    for index, prob in answers.values():
        assert (index == first[0]).all() and np.allclose(prob, first[1])
    # UINT8 pixels at the contract, binary; no outputs named: all of them, binary by default
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    result = client.infer("digits", [tensor], headers=headers)
    assert (result.as_numpy("index") == first[0]).all()
    assert result.as_numpy("label").shape == (3, 5) and result.as_numpy("abstain").dtype == np.bool_
    # typed errors: the message names the problem
    with pytest.raises(InferenceServerException, match="not served here"):
        client.infer("nope", [images], headers=headers)
    bad = httpclient.InferInput("images", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_), binary_data=True)
    with pytest.raises(InferenceServerException, match="image"):
        client.infer("digits", [bad], headers=headers)
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("digits")  # token auth is on: no key, no metadata
    client.close()


def test_tritonclient_grpc_every_call(oip):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    pngs, pixels = _digits(3)
    client = grpcclient.InferenceServerClient(oip["grpc"])
    headers = {"authorization": auth_header(oip)["Authorization"]}
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata(headers=headers).extensions == ["binary_tensor_data"]
    assert client.is_model_ready("digits", headers=headers)
    meta = client.get_model_metadata("digits", headers=headers)
    assert [i.datatype for i in meta.inputs] == ["BYTES", "UINT8"]
    images = grpcclient.InferInput("images", [3], "BYTES")
    images.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    result = client.infer("digits", [images], headers=headers, request_id="g-1",
                          parameters={"topk": 3})
    assert result.get_response().id == "g-1"
    index = result.as_numpy("index")
    assert index.shape == (3, 3)
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    pixel_result = client.infer("digits", [tensor], headers=headers,
                                outputs=[grpcclient.InferRequestedOutput("index")])
    assert (pixel_result.as_numpy("index")[:, :3] == index).all()
    assert pixel_result.as_numpy("probability") is None  # only what was asked for
    # the same answer as /predictions for the same bytes
    status, doc, _ = post(oip, "digits", pngs[0], "image/png", headers={"X-TopK": "3"})
    assert status == 200 and [c["index"] for c in doc["predictions"][0]] == list(index[0])
    for call, match in ((lambda: client.infer("nope", [images], headers=headers), "not served"),
                        (lambda: client.infer("digits", [images]), "authorization"),
                        (lambda: client.get_model_metadata("nope", headers=headers), "not served")):
        with pytest.raises(InferenceServerException, match=match):
            call()
    bad = grpcclient.InferInput("images", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as err:
        client.infer("digits", [bad], headers=headers)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "image" in err.value.message()
    client.close()


def test_every_route_answers_json_errors(oip):
    """Unknown routes, wrong methods, unknown models and bad v2 bodies: small 4xx JSON everywhere."""
    cases = [("GET", "/nope"), ("GET", "/predictions/digits"), ("POST", "/predictions/nope"),
             ("DELETE", "/v2/models/digits/infer"), ("POST", "/v2/models/nope/infer"),
             ("GET", "/v2/models/nope"), ("POST", "/v1/models/digits:explain"), ("GET", "/v2/health/nope")]
    for method, path in cases:
        answer = request(method, oip["url"] + path, b"{}" if method == "POST" else None, auth_header(oip))
        doc = json.loads(answer.body)
        assert 400 <= answer.status < 500 and {"code", "type", "message"} <= set(doc), (method, path, answer)
    # a binary-extension body whose header length lies
    answer = request("POST", oip["url"] + "/v2/models/digits/infer", b'{"inputs": []}',
                     {**auth_header(oip), "Content-Type": "application/octet-stream",
                      "Inference-Header-Content-Length": "999"})
    assert answer.status == 400 and "outside the body" in json.loads(answer.body)["error"], answer


# --------------------------------------------------------------------------------------------------
# HTTP/1.1
# --------------------------------------------------------------------------------------------------
def _connect(url: str) -> socket.socket:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _read_response(f) -> tuple[int, dict, bytes]:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    return status, headers, f.read(int(headers.get("content-length", 0)))


def test_pipelined_requests_are_answered_in_order(oip):
    """300 requests in one write on one connection, each with its own X-TopK: each answer has the
    number of classes its own request asked for, in request order."""
    png = _digits(1)[0][0]
    token = auth_header(oip)["Authorization"]
    topks = [1 + i % 10 for i in range(300)]
    wire = b"".join(f"POST /predictions/digits HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                    f"Authorization: {token}\r\nX-TopK: {k}\r\nContent-Length: {len(png)}\r\n\r\n".encode() + png
                    for k in topks)
    with _connect(oip["url"]) as s, s.makefile("rb") as f:
        s.sendall(wire)
        got = []
        for _ in topks:
            status, _, body = _read_response(f)
            assert status == 200, body
            got.append(len(json.loads(body)["predictions"][0]))
    misplaced = sum(a != b for a, b in zip(got, topks))
    assert misplaced == 0, f"{misplaced} of {len(topks)} answers out of order"


def test_connection_close_is_honoured(oip):
    png = _digits(1)[0][0]
    with _connect(oip["url"]) as s, s.makefile("rb") as f:
        s.sendall(f"POST /predictions/digits HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: image/png\r\n"
                  f"Authorization: {auth_header(oip)['Authorization']}\r\nContent-Length: {len(png)}\r\n\r\n".encode()
                  + png)
        status, headers, _ = _read_response(f)
        assert status == 200 and headers.get("connection") == "close"
        assert f.read() == b""  # the server closed the socket


@pytest.fixture(scope="module")
def strict_oip(tmp_path_factory, served):
    """A private oip server over the session's digits archive with tight connection bounds."""
    if served["runtime"] != "oip":
        pytest.skip("oip only")
    root = tmp_path_factory.mktemp("strict-oip")
    store = root / "store"
    store.mkdir()
    shutil.copy(served["store"] / "digits.mar", store)
    proc, url = _serve_oip(store, ["digits"], root / "work",
                           ("--workers", "1", "--read-timeout-s", "1", "--max-connections", "40",
                            "--max-header-bytes", "4096", "--max-request-bytes", str(LIMITS.max_image_bytes)))
    yield {"url": url, "proc": proc}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    if not wait_until_ok(url + "/v2/health/ready", timeout, alive=lambda: proc.poll() is None):
        raise AssertionError(f"not ready (exit code {proc.poll()}): {log.read_text()[-2000:]}")


def _predicts(url: str) -> bool:
    png = _digits(1)[0][0]
    answer = request("POST", url + "/predictions/digits", png, {"Content-Type": "image/png"})
    return answer.status == 200 and bool(json.loads(answer.body)["predictions"])


def test_slow_and_idle_clients_are_bounded(strict_oip):
    """Clients that trickle headers or say nothing are closed after the read timeout (408 JSON); a
    normal client is answered meanwhile."""
    url = strict_oip["url"]
    slow = [_connect(url) for _ in range(10)]
    idle = [_connect(url) for _ in range(10)]
    for s in slow:
        s.sendall(b"POST /predictions/digits HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    assert _predicts(url)
    for s in slow + idle:
        s.settimeout(10)
        with s.makefile("rb") as f:  # the server ends it within its read timeout (1 s)
            status, _, body = _read_response(f)
            assert status == 408 and json.loads(body)["type"] == "request_timeout"
            assert f.read() == b""
        s.close()
    assert _predicts(url)


def test_connection_flood_is_refused_at_the_cap_and_normal_clients_recover(strict_oip):
    url = strict_oip["url"]
    flood = [_connect(url) for _ in range(60)]  # the cap is 40
    answers = []
    for s in flood:  # every one is answered: 503 at once past the cap, 408 after the 1 s read timeout below it
        s.settimeout(10)
        with s.makefile("rb") as f:
            status, _, body = _read_response(f)
        answers.append((status, json.loads(body)["type"]))
    refused = answers.count((503, "too_many_connections"))
    assert set(answers) <= {(503, "too_many_connections"), (408, "request_timeout")}, answers
    assert refused >= 19, answers  # everything past the 40th (the client's own may be counted too)
    for s in flood:
        s.close()
    deadline = time.monotonic() + 10
    while not _predicts(url):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_oversized_headers_bodies_and_garbage_are_refused_early(strict_oip):
    url = strict_oip["url"]
    cases = {
        "headers": (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
        "content-length": (b"POST /predictions/digits HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n", 413),
        "garbage": (b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n", 400),
    }
    for name, (wire, code) in cases.items():
        with _connect(url) as s, s.makefile("rb") as f:
            s.sendall(wire)  # no body follows the huge Content-Length: refused before it is read
            status, _, body = _read_response(f)
            assert status == code and json.loads(body)["code"] == code, (name, status, body)
    assert _predicts(url)


# --------------------------------------------------------------------------------------------------
# archives made elsewhere, and stopping
# --------------------------------------------------------------------------------------------------
def _serve_oip(store: Path, names: list[str], work: Path, extra: tuple = ()) -> tuple[subprocess.Popen, str]:
    ports = {k: free_port() for k in ("http", "grpc", "metrics")}
    cmd = [sys.executable, "-m", "serving.oip", "--model-store", str(store), "--models", *names,
           "--workdir", str(work), *[x for k, p in ports.items() for x in (f"--{k}", f"127.0.0.1:{p}")], *extra]
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=open(work / "oip.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{ports['http']}"
    _wait_ready(url, proc, work / "oip.log")
    return proc, url


def test_a_stock_basehandler_archive_answers_as_on_torchserve(oip, digits_checkpoint, tmp_path):
    """A TorchServe user's archive (a BaseHandler subclass, serialized checkpoint) serves unchanged."""
    from loadtest.torchserve import STOCK_HANDLER, PrivateServer, baseline_archive

    store = tmp_path / "store"
    baseline_archive(STOCK_HANDLER, "stock", store, serialized_file=digits_checkpoint)
    pngs, _ = _digits(4, seed=3)
    answers = {}
    with PrivateServer(store, ["stock"], workdir=tmp_path / "ts") as ts:
        answers["torchserve"] = [request("POST", ts.url + "/predictions/stock", p, {"Content-Type": "image/png"})
                                 for p in pngs]
    proc, url = _serve_oip(store, ["stock"], tmp_path / "oip")
    try:
        answers["oip"] = [request("POST", url + "/predictions/stock", p, {"Content-Type": "image/png"})
                          for p in pngs]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    assert all(a.status == 200 for a in answers["torchserve"] + answers["oip"]), answers
    assert [a.json() for a in answers["oip"]] == [a.json() for a in answers["torchserve"]]


def test_a_second_sigterm_is_harmless():
    """`make stop` signals the process group, then the supervisor signals each worker: the second
    SIGTERM's handler must not raise (it runs between two bytecodes of a request or a batch, and once
    answered one of three in-flight requests 500 in CI)."""
    import asyncio

    import uvicorn

    from serving.oip.worker import AcceptingServer, accept_all

    async def twice() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        server = AcceptingServer(uvicorn.Config(app=None))
        server.on_exit = accept_all(asyncio.get_running_loop(), listener, lambda: None)
        server.handle_exit(signal.SIGTERM, None)
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit and listener.fileno() == -1

    asyncio.run(twice())


def test_sigterm_drains_in_flight_requests(oip, tmp_path):
    """Requests the runtime has read, waiting in a batch when SIGTERM arrives, are answered; then it
    exits 0 (what `make stop` and Kubernetes send)."""
    from serving.archive import ArchiveConfig, build_archive

    store = tmp_path / "store"
    build_archive(ArchiveConfig(run="digits", artifacts_dir=str(oip["artifacts"]), model_store=str(store),
                                variant_cpu="onnx-fp32", batch_size=8, max_batch_delay_ms=3000, limits=LIMITS),
                  log=lambda _m: None)  # a batch of 8 waits up to 3 s: three requests sit in it
    proc, url = _serve_oip(store, ["digits"], tmp_path / "work", ("--workers", "1"))
    png = _digits(1)[0][0]
    wire = (f"POST /predictions/digits HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(png)}\r\n\r\n").encode() + png
    clients = [_connect(url) for _ in range(3)]
    for c in clients:
        c.sendall(wire)
    # A barrier: a later connection's answer means the event loop has read the earlier ones' bytes.
    assert request("GET", url + "/v2/health/live").status == 200
    os.killpg(proc.pid, signal.SIGTERM)
    for c in clients:
        with c, c.makefile("rb") as f:
            status, _, body = _read_response(f)
            assert status == 200 and json.loads(body)["predictions"], body
    assert proc.wait(60) == 0
    log = (tmp_path / "work" / "oip.log").read_text()
    assert "Traceback" not in log, log  # nothing raised on the way out, even where no request saw it
