"""Hostile traffic against the session's real TorchServe: no request, however crafted, ends a worker.

Every case here is something an attacker can send for free: client strings of any length in every
field and header that reaches the handler (they used to be echoed into the answer until it exceeded
TorchServe's max_response_size, and the frontend killed the worker), wrong JSON types everywhere, v2
tensors of the wrong type, shape or range, tiny files that decode to megapixels, the costliest
requests the limits admit, in concurrent bursts. Each answer must be a 4xx/413/503 small JSON error
or a correct prediction, and TorchServe must report no worker restart across the whole module.
The control plane (management API) must refuse to fetch any URL and refuse state changes without
the token. A full queue must answer 503 at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.server
import io
import json
import threading
import time

import pytest
from PIL import Image

from served import LIMITS, TINYQ_QUEUE, assert_serves, b64, post, worker_deaths, workers
from serving.client import heldout_digits
from serving.httpclient import multipart, request
from training.images import encode_png
from serving.server import free_port

pytestmark = pytest.mark.slow

MAX_ERROR_BYTES = 1024  # an error answer is "small JSON"
LONG = 900_000  # just under the test server's max_request_size (served.MAX_REQUEST_SIZE)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _v2(tensor: dict, **doc) -> bytes:
    return json.dumps({"inputs": [tensor], **doc}).encode()


def hostile_cases() -> dict[str, tuple[bytes, str, dict, str]]:
    """name -> (body, content type, extra headers, model path)."""
    png = encode_png(heldout_digits(1)[0][0])
    pixels = heldout_digits(1)[0][0].reshape(-1).tolist()
    long = "A" * LONG
    uint8 = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8"}
    v2path = "/v2/models/digits/infer"
    cases = {
        # client strings of any length, in every field that reaches the handler
        "long topk in JSON": (json.dumps({"instances": [{"b64": b64(png)}], "parameters": {"topk": long}}).encode(),
                              "application/json", {}, ""),
        "long invert in JSON": (json.dumps({"instances": [{"b64": b64(png)}], "parameters": {"invert": long}}).encode(),
                                "application/json", {}, ""),
        "long v2 id": (_v2({**uint8, "data": pixels}, id=long), "application/json", {}, v2path),
        "long v2 name": (_v2({**uint8, "name": long, "data": pixels}), "application/json", {}, v2path),
        "long v2 datatype": (_v2({**uint8, "datatype": long, "data": pixels}), "application/json", {}, v2path),
        "long v2 shape": (_v2({**uint8, "shape": [1] * (LONG // 3), "data": pixels}), "application/json", {}, v2path),
        "long b64": (json.dumps({"instances": [{"b64": "!" * LONG}]}).encode(), "application/json", {}, ""),
        "long unknown key": (json.dumps({long: 1}).encode(), "application/json", {}, ""),
        "long min_confidence in JSON": (json.dumps({"instances": [{"b64": b64(png)}],
                                                    "parameters": {"min_confidence": long}}).encode(),
                                        "application/json", {}, ""),
        "long X-TopK header": (png, "image/png", {"X-TopK": "9" * 7000}, ""),
        "long X-Min-Confidence header": (png, "image/png", {"X-Min-Confidence": "0." + "5" * 7000 + "x"}, ""),
        "long X-Invert header": (png, "image/png", {"X-Invert": "y" * 7000}, ""),
        "long multipart field name": (*multipart({"f" * 7000: ("a.png", b"", "image/png")}), {}, ""),
        "long multipart topk field": (*multipart({"file": ("a.png", png, "image/png"),
                                                  "topk": ("t", b"7" * LONG, "text/plain")}), {}, ""),
        # wrong JSON types everywhere
        "long multipart min_confidence field": (*multipart({"file": ("a.png", png, "image/png"),
                                                            "min_confidence": ("t", b"0" * LONG + b"x", "text/plain")}),
                                                {}, ""),
        "min_confidence as string": (json.dumps({"instances": [{"b64": b64(png)}],
                                                 "parameters": {"min_confidence": "0.5"}}).encode(),
                                     "application/json", {}, ""),
        "min_confidence as bool": (json.dumps({"instances": [{"b64": b64(png)}],
                                               "parameters": {"min_confidence": True}}).encode(),
                                   "application/json", {}, ""),
        "min_confidence NaN": (b'{"instances": [{"b64": "' + b64(png).encode() + b'"}], '
                               b'"parameters": {"min_confidence": NaN}}', "application/json", {}, ""),
        "min_confidence huge int": (b'{"instances": [{"b64": "' + b64(png).encode() + b'"}], '
                                    b'"parameters": {"min_confidence": 1' + b"0" * 5000 + b"}}",
                                    "application/json", {}, ""),
        "topk as string": (json.dumps({"instances": [{"b64": b64(png)}], "parameters": {"topk": "3"}}).encode(),
                           "application/json", {}, ""),
        "topk as float": (json.dumps({"instances": [{"b64": b64(png)}], "parameters": {"topk": 2.5}}).encode(),
                          "application/json", {}, ""),
        "topk as bool": (json.dumps({"instances": [{"b64": b64(png)}], "parameters": {"topk": True}}).encode(),
                         "application/json", {}, ""),
        "topk as list": (json.dumps({"instances": [{"b64": b64(png)}], "parameters": {"topk": [3]}}).encode(),
                         "application/json", {}, ""),
        "topk huge int": (b'{"instances": [{"b64": "' + b64(png).encode() + b'"}], "parameters": {"topk": 1'
                          + b"0" * 5000 + b"}}", "application/json", {}, ""),
        "invert as number": (json.dumps({"instances": [{"b64": b64(png)}], "parameters": {"invert": 1}}).encode(),
                             "application/json", {}, ""),
        "parameters as list": (json.dumps({"instances": [{"b64": b64(png)}], "parameters": [1]}).encode(),
                               "application/json", {}, ""),
        "instances as object": (b'{"instances": {"b64": "x"}}', "application/json", {}, ""),
        "b64 as number": (b'{"instances": [{"b64": 5}]}', "application/json", {}, ""),
        "v2 inputs as object": (b'{"inputs": {"name": "x"}}', "application/json", {}, v2path),
        "v2 id as number": (_v2({**uint8, "data": pixels}, id=7), "application/json", {}, v2path),
        "v2 shape as string": (_v2({**uint8, "shape": "1,1,28,28", "data": pixels}), "application/json", {}, v2path),
        "v2 shape of bools": (_v2({**uint8, "shape": [True, True, 28, 28], "data": pixels}), "application/json", {}, v2path),
        "v2 data as string": (_v2({**uint8, "data": "0" * 784}), "application/json", {}, v2path),
        # v2 tensors of wrong dtype, shape or range
        "v2 uint8 floats": (_v2({**uint8, "data": [1.9] * 784}), "application/json", {}, v2path),
        "v2 uint8 strings": (_v2({**uint8, "data": ["7"] * 784}), "application/json", {}, v2path),
        "v2 uint8 bools": (_v2({**uint8, "data": [True] * 784}), "application/json", {}, v2path),
        "v2 uint8 one bool": (_v2({**uint8, "data": pixels[:-1] + [True]}), "application/json", {}, v2path),
        "v2 uint8 over 255": (_v2({**uint8, "data": [256] * 784}), "application/json", {}, v2path),
        "v2 uint8 negative": (_v2({**uint8, "data": [-1] * 784}), "application/json", {}, v2path),
        "v2 uint8 too few": (_v2({**uint8, "data": pixels[:-1]}), "application/json", {}, v2path),
        "v2 uint8 too many": (_v2({**uint8, "data": pixels * 50}), "application/json", {}, v2path),
        "v2 uint8 ragged": (_v2({**uint8, "data": [pixels[:392], 5]}), "application/json", {}, v2path),
        "v2 uint8 wrong shape": (_v2({**uint8, "shape": [1, 3, 28, 28], "data": pixels * 3}),
                                 "application/json", {}, v2path),
        "v2 bytes shape 2d": (_v2({"name": "x", "shape": [1, 2], "datatype": "BYTES", "data": [[b64(png), b64(png)]]}),
                              "application/json", {}, v2path),
        "v2 bytes of numbers": (_v2({"name": "x", "shape": [2], "datatype": "BYTES", "data": [1, 2]}),
                                "application/json", {}, v2path),
        "v2 huge count": (_v2({"name": "x", "shape": [10**6], "datatype": "BYTES", "data": []}),
                          "application/json", {}, v2path),
    }
    cases.update({f"bomb-like {name}": (data, "application/octet-stream", {}, "")
                  for name, data in bomb_like_images().items()})
    return cases


def bomb_like_images() -> dict[str, bytes]:
    """Tiny files that decode to megapixels (just under the test server's max_pixels)."""
    side = int((LIMITS.max_pixels * 0.95) ** 0.5)
    flat_l, flat_rgb = Image.new("L", (side, side), 0), Image.new("RGB", (side, side), (9, 9, 9))
    return {
        "PNG 1-bit": _encode(Image.new("1", (side, side), 0), "PNG"),
        "PNG gray": _encode(flat_l, "PNG"),
        "GIF": _encode(flat_l.convert("P"), "GIF"),
        "WebP": _encode(flat_rgb, "WEBP", lossless=True),
        "TIFF deflate": _encode(flat_l, "TIFF", compression="tiff_adobe_deflate"),
        "JPEG": _encode(flat_rgb, "JPEG", quality=1),
        "GIF 1000 frames": _encode(Image.new("P", (8, 8)), "GIF", save_all=True,
                                   append_images=[Image.new("P", (8, 8), i % 256) for i in range(1000)]),
    }


def costliest_admitted() -> bytes:
    """max_images images of max_request_pixels / max_images pixels each, in as few bytes as the ratio
    check admits (``loadtest.attacks``, what make fault's attackers send): the most decoding one
    request may ask for."""
    from loadtest.attacks import _encode, _noisy, admitted

    per = LIMITS.max_request_pixels // LIMITS.max_images
    side = int(per ** 0.5)
    png = admitted(lambda rows: _encode(_noisy("L", (side, side), rows), "PNG"), side * side, LIMITS)
    return json.dumps({"instances": [{"b64": b64(png)}] * LIMITS.max_images}).encode()


def _check_answer(name: str, status: int, doc, hdrs) -> str | None:
    raw = hdrs["_raw"]
    if status == 200:
        ok = isinstance(doc, dict) and ("predictions" in doc or "outputs" in doc)
        return None if ok else f"{name}: 200 without a prediction: {raw[:200]!r}"
    if status not in (400, 401, 404, 405, 413, 415, 503) or not isinstance(doc, dict) or \
            not {"code", "type", "message"} <= set(doc):
        return f"{name}: HTTP {status}, not a 4xx/503 JSON error: {raw[:200]!r}"
    if len(raw) > MAX_ERROR_BYTES:
        return f"{name}: HTTP {status}, a {len(raw)}-byte error answer"
    return None


@pytest.fixture
def unharmed(served):
    """The workers and the worker-death lines logged before the test; the test ends by calling the
    check this returns: the same workers, no worker died or restarted meanwhile, and the next valid
    request is answered. Each test checks its own requests, whatever ran before it."""
    before = {m: workers(served, m) for m in ("digits", "cifarnet")}
    deaths = len(worker_deaths(served))

    def check() -> None:
        assert {m: workers(served, m) for m in before} == before
        assert worker_deaths(served)[deaths:] == []
        assert_serves(served)

    return check


def test_hostile_requests_get_small_errors(served, unharmed):
    failures = []
    for name, (body, ctype, headers, path) in hostile_cases().items():
        status, doc, hdrs = post(served, "digits", body, ctype, headers, path=path or None)
        problem = _check_answer(name, status, doc, hdrs)
        if problem:
            failures.append(problem)
        elif name.startswith(("long", "topk", "invert", "min_confidence", "parameters", "instances", "b64", "v2")) \
                and status == 200:
            failures.append(f"{name}: accepted (HTTP 200)")
    assert not failures, "\n".join(failures)
    unharmed()


def test_every_bomb_like_format_is_refused_before_decoding(served, unharmed):
    for name, data in bomb_like_images().items():
        status, doc, _ = post(served, "digits", data)
        if name == "GIF 1000 frames":  # only the first frame is decoded: an ordinary tiny image
            assert status == 200, doc
        elif name == "JPEG":  # decoded at 1/8 scale: cheap, so admitted if its ratio is
            assert status in (200, 413), doc
        else:
            assert (status, doc["type"]) == (413, "bomb_like_image"), (name, status, doc)
    unharmed()


def test_bursts_of_the_costliest_admitted_requests(served, unharmed):
    """16 concurrent max-count requests of max-size images, with normal requests among them: every
    answer is a prediction or a 503 (the batch's pixel budget spent); no normal request fails."""
    costly = costliest_admitted()
    png = encode_png(heldout_digits(1)[0][0])
    jobs = [("costly", costly, "application/json")] * 16 + [("normal", png, "image/png")] * 16
    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda j: (j[0], post(served, "digits", j[1], j[2], timeout=120)), jobs))
    failures = [p for kind, (s, d, h) in results if (p := _check_answer(kind, s, d, h))]
    failures += [f"normal request: HTTP {s} {d}" for kind, (s, d, _) in results if kind == "normal" and s != 200]
    codes = sorted({s for _, (s, _, _) in results})
    assert not failures, "\n".join(failures)
    assert set(codes) <= {200, 503}, codes
    assert any(k == "costly" and s == 200 for k, (s, _, _) in results), "no costly request was admitted"
    unharmed()


def test_a_full_queue_answers_503_at_once(served):
    """tinyq has one worker, batch 1 and a queue of 2: a burst gets 503 JSON without waiting in the
    queue, not a pile-up."""
    costly = costliest_admitted()
    with cf.ThreadPoolExecutor(12) as pool:
        def answered(_):
            status, doc, hdrs = post(served, "tinyq", costly, "application/json", timeout=120)
            return status, doc, hdrs, time.monotonic()  # when the answer arrived
        results = list(pool.map(answered, range(12)))
    refused = [(d, t) for s, d, _, t in results if s == 503]
    assert {s for s, *_ in results} <= {200, 503}, [(s, d) for s, d, *_ in results]
    # TorchServe: one worker, its batch and the queue, and 2 answered during the burst. oip: every
    # worker process serves tinyq, each with its share of the queue plus a batch, and 2 answered each.
    n = len(workers(served, "tinyq")) if served["runtime"] == "oip" else 1
    admitted = TINYQ_QUEUE + 2 if n == 1 else n * (max(1, TINYQ_QUEUE // n) + 1) + 2 * n
    assert len(refused) >= 12 - admitted, f"only {len(refused)} of 12 refused with a queue of {TINYQ_QUEUE}"
    assert all(isinstance(d, dict) and d.get("code") == 503 for d, _ in refused), refused[:1]
    # An order, not a speed: a request is refused while the queue is full, so the requests then queued
    # are still to be answered, each after a model call on the costliest image; a refusal that waited
    # in the queue would arrive with or after the last of them.
    last_ok = max(t for s, _, _, t in results if s == 200)
    assert max(t for _, t in refused) < last_ok, "a refusal was answered only after the queue drained"
    status, _, _ = post(served, "tinyq", encode_png(heldout_digits(1)[0][0]), "image/png")
    assert status == 200


class _Listener:
    """An HTTP server on a free port that records every request it receives."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- http.server's naming
                seen.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"PK\x03\x04 not really an archive")

            def log_message(self, *_):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_control_plane_fetches_no_url_and_needs_the_token(served):
    """TorchServe: its management API refuses URL fetches and needs the token. The oip runtime has no
    management API: the same calls, on its inference port, are unknown routes (404 JSON), fetch nothing."""
    listener = _Listener()
    oip = served["runtime"] == "oip"
    mgmt = served["url"] if oip else served["management"]
    token = {"Authorization": f"Bearer {served['management_token']}"}
    try:
        attempts = {
            "workflow from http": f"{mgmt}/workflows?url=http://127.0.0.1:{listener.port}/evil.war",
            "model from http": f"{mgmt}/models?url=http://127.0.0.1:{listener.port}/evil.mar",
            "workflow from a local file": f"{mgmt}/workflows?url=file:///etc/hostname",
            "workflow by name": f"{mgmt}/workflows?url=evil.war",
        }
        answers = {}
        for name, url in attempts.items():
            for auth in ({}, token):
                answer = request("POST", url, headers=auth)
                answers[(name, bool(auth))] = (answer.status, answer.body[:200])
        # No wait needed: TorchServe fetches a registration's URL before it answers the call (the
        # answer is the sign it is done with it), and the listener records a request before it
        # replies, so a fetch made for any of these calls is already in ``seen``.
        assert listener.seen == [], f"the server fetched {listener.seen}"
        assert all(400 <= s < 500 for s, _ in answers.values()), answers
        if oip:
            # without the key every inference-port route is 401, with it these are unknown routes
            assert all((s, f'"code": {s}'.encode() in raw) == ((404, True) if authed else (401, True))
                       for (_, authed), (s, raw) in answers.items()), answers
            return
        # (TorchServe refuses a missing or wrong token with 400 InvalidKeyException)
        assert all(s in (400, 401) and b"InvalidKeyException" in raw
                   for (_, authed), (s, raw) in answers.items() if not authed), answers
    finally:
        listener.close()
    # state-changing management calls without the token are refused; reads with it work
    for method, path in (("PUT", "/models/digits?min_worker=3"), ("DELETE", "/models/digits"),
                         ("PUT", "/models/digits/1.0/set-default")):
        answer = request(method, mgmt + path)
        assert answer.status in (400, 401) and b"InvalidKeyException" in answer.body, (method, path, answer)
    assert len(workers(served, "digits")) == 2


@pytest.mark.parametrize("config", ["serving/config.properties", "deploy/config/config.properties"])
def test_every_config_closes_the_control_plane(config):
    """Both shipped configs (make serve; the container, compose and Kubernetes) refuse URL fetches
    and workflow registration, keep model registration off and management on loopback."""
    import re
    from pathlib import Path

    from serving.server import REPO, read_properties

    props = read_properties(REPO / config)
    patterns = [re.compile(p) for p in props["allowed_urls"].split(",")]
    for url in ("http://127.0.0.1:9/x.mar", "https://example.com/x.war", "file:///etc/passwd",
                "file:///opt/visionpipe/model-store/../../etc/x.mar", "FILE:///tmp/x.mar"):
        assert not any(p.fullmatch(url) for p in patterns), (config, url)
    assert not Path(props["workflow_store"]).exists()
    assert props["enable_model_api"] == "false"
    assert props["management_address"].startswith("http://127.0.0.1:")
