"""End-to-end: real servers of both runtimes (TorchServe; the Java-free oip runtime) serving archives
built here.

The servers are the session's (``served`` in conftest.py, described in tests/served.py): every test
below runs against each. Tests post real
PNG/JPEG bytes, multipart and base64 batches, KServe v2 requests, and every bad input.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from served import LIMITS, MAX_REQUEST_SIZE, assert_serves, auth_header, b64, post
from serving.client import heldout_digits
from serving.httpclient import Session, multipart, request
from training.images import encode_png
from serving.server import PID_FILE
from test_serving_core import bad_inputs, bad_requests, encode, exotic_modes

pytestmark = pytest.mark.slow

# --------------------------------------------------------------------------------------------------
def test_serve_cli_archived_and_warmed_up(served):
    out = served["serve_output"]
    assert "digits: wrote" in out  # exported but not archived -> archived by `serve`
    assert "cifarnet: version" in out and "digits: version" in out and "warm-up answered" in out
    # the curl lines post samples/<RUN>/ (make demo / make export write it); a fresh clone has none yet
    assert ('curl -H "Authorization: Bearer $TOKEN"' in out and "/predictions/digits" in out) \
        or ("# no samples/digits/ to post" in out and not Path("samples/digits").is_dir())
    assert "TOKEN=$(python3 -c" in out and str(served["work"] / "key_file.json") in out
    assert (served["work"] / PID_FILE).is_file()


def test_token_is_required(served):
    png = encode_png(heldout_digits(1)[0][0])
    for token in ("", "wrong-key"):
        status, doc, _ = post(served, "digits", png, "image/png", headers={"Authorization": f"Bearer {token}"})
        # TorchServe refuses with 400 InvalidKeyException, the oip runtime with 401 unauthorized
        assert (status, doc["type"]) in ((400, "InvalidKeyException"), (401, "unauthorized")), (status, doc)
    assert_serves(served)


def test_png_predictions_match_the_exported_variant(served):
    """Posting held-out digits as PNG gives what the variant itself says about the same pixels."""
    from export.runtime import load_variant

    images, labels = heldout_digits(6, seed=1)
    runner = load_variant(served["artifacts"] / "digits", "onnx-fp32")
    expected = runner(images).argmax(axis=1)
    manifest = served["manifests"]["digits"]
    for img, want in zip(images, expected):
        status, doc, hdrs = post(served, "digits", encode_png(img), "image/png")
        assert status == 200, doc
        assert hdrs["content-type"].startswith("application/json")
        assert (doc["model"], doc["version"], doc["variant"], doc["device"]) == \
            ("digits", manifest["version"], "onnx-fp32", "cpu")
        top = doc["predictions"][0]
        assert len(top) == 5 and top[0]["index"] == int(want) and top[0]["label"] == str(int(want))
        probs = [c["probability"] for c in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_jpeg_to_cifarnet_torchscript(served):
    rgb = Image.fromarray(np.random.default_rng(3).integers(0, 255, (240, 320, 3), np.uint8))
    status, doc, _ = post(served, "cifarnet", encode(rgb, "JPEG", quality=90), "image/jpeg",
                          headers={"X-TopK": "3"})
    assert status == 200, doc
    assert doc["variant"] == "torchscript-fp32" and len(doc["predictions"][0]) == 3
    names = set(served["manifests"]["cifarnet"]["contract"]["class_names"])
    assert {c["label"] for c in doc["predictions"][0]} <= names


def test_multipart_and_base64_batches_agree_with_single_posts(served):
    images, _ = heldout_digits(3, seed=2)
    pngs = [encode_png(x) for x in images]
    singles = [post(served, "digits", p, "image/png")[1]["predictions"][0] for p in pngs]
    body, ctype = multipart({f"file{i}": (f"{i}.png", p, "image/png") for i, p in enumerate(pngs)})
    status, doc, _ = post(served, "digits", body, ctype)
    assert status == 200 and doc["predictions"] == singles
    body = json.dumps({"instances": [{"b64": b64(p)} for p in pngs], "parameters": {"topk": 2}}).encode()
    status, doc, _ = post(served, "digits", body, "application/json")
    assert status == 200 and doc["predictions"] == [s[:2] for s in singles]


def test_kserve_v2_infer(served):
    images, _ = heldout_digits(2, seed=3)
    doc = {"id": "req-1", "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                      "data": [b64(encode_png(x)) for x in images]}]}
    status, out, _ = post(served, "digits", json.dumps(doc).encode(), "application/json",
                          path="/v2/models/digits/infer")
    assert status == 200, out
    assert out["id"] == "req-1" and out["model_name"] == "digits"
    assert [o["name"] for o in out["outputs"]] == ["label", "index", "probability", "abstain", "ood", "ood_score"]
    assert out["outputs"][0]["shape"] == [2, 5]
    doc = {"inputs": [{"name": "pixels", "shape": [2, 1, 28, 28], "datatype": "UINT8",
                       "data": images.reshape(-1).tolist()}], "parameters": {"topk": 1}}
    status, out2, _ = post(served, "digits", json.dumps(doc).encode(), "application/json",
                           path="/v2/models/digits/infer")
    assert status == 200 and out2["outputs"][1]["data"] == out["outputs"][1]["data"][::5]


def test_min_confidence_marks_abstentions_and_keeps_the_answers(served):
    """The model default (0 in the session archive) abstains never; a request's threshold, from JSON,
    a header or a multipart field, marks exactly the images whose top probability is below it."""
    images, _ = heldout_digits(4, seed=5)
    pngs = [encode_png(x) for x in images]
    body = json.dumps({"instances": [{"b64": b64(p)} for p in pngs]}).encode()
    status, plain, _ = post(served, "digits", body, "application/json")
    assert status == 200 and plain["abstain"] == [False] * 4
    tops = [row[0]["probability"] for row in plain["predictions"]]
    cut = sorted(tops)[1] if len(set(tops)) > 1 else 1.0  # between the images, so both flags occur
    body = json.dumps({"instances": [{"b64": b64(p)} for p in pngs],
                       "parameters": {"min_confidence": cut}}).encode()
    status, doc, _ = post(served, "digits", body, "application/json")
    assert status == 200 and doc["predictions"] == plain["predictions"]
    assert doc["abstain"] == [t < cut for t in tops]
    status, doc, _ = post(served, "digits", pngs[0], "image/png", headers={"X-Min-Confidence": "1"})
    assert status == 200 and doc["abstain"] == [tops[0] < 1.0]
    form, ctype = multipart({"f": ("0.png", pngs[0], "image/png"), "min_confidence": ("", b"0", "text/plain")})
    status, doc, _ = post(served, "digits", form, ctype)
    assert status == 200 and doc["abstain"] == [False]
    for bad in ("1.5", "nan", "high"):
        status, doc, _ = post(served, "digits", pngs[0], "image/png", headers={"X-Min-Confidence": bad})
        assert status == 400 and doc["type"] == "bad_parameter" and "min_confidence" in doc["message"], doc


@pytest.mark.parametrize("name", list(exotic_modes()))
def test_exotic_modes_are_served(served, name):
    status, doc, _ = post(served, "cifarnet", exotic_modes()[name])
    assert status == 200, doc


def _as_http(params: dict) -> tuple[bytes, str, dict]:
    """TorchServe parameters (as the handler sees them) -> the HTTP request that produces them."""
    headers = {f"X-{k}": v.decode() for k, v in params.items() if k in ("topk", "invert")}
    if "body" in params:
        return params["body"], "application/json" if params["body"][:1] in b"{[" else "image/png", headers
    if not params:
        return b"", "image/png", headers
    body, ctype = multipart({k: (k, v, "image/png") for k, v in params.items()})
    return body, ctype, {}


def test_every_bad_input_gets_a_4xx_json_and_the_server_keeps_serving(served):
    cases = {f"image:{k}": (data, "image/png", {}, code, kind)
             for k, (data, code, kind) in bad_inputs(LIMITS).items()}
    cases.update({f"request:{k}": (*_as_http(params), code, kind)
                  for k, (params, code, kind) in bad_requests(LIMITS).items()})
    failures = []
    for name, (body, ctype, headers, code, kind) in cases.items():
        status, doc, _ = post(served, "digits", body, ctype, headers)
        if status != code or not doc or doc.get("type") != kind or set(doc) != {"code", "type", "message"}:
            failures.append(f"{name}: HTTP {status} {doc}")
    # curl --data-binary without -H: TorchServe parses the bytes as a form. (Most binary files make
    # TorchServe's own form decoder fail with a 500 before the handler runs -- documented in the
    # README; a body it can parse reaches the handler, which names the fix.)
    status, doc, _ = post(served, "digits", b"image=not-really-an-image", "application/x-www-form-urlencoded")
    if status != 415 or not doc or doc.get("type") != "form_encoded_body":
        failures.append(f"form-encoded: HTTP {status} {doc}")
    assert not failures, "\n".join(failures)
    assert_serves(served)


def test_body_over_max_request_size_is_refused_before_any_worker(served):
    # Both runtimes answer 413 as soon as they read the Content-Length, before any worker (TorchServe
    # with no JSON body of ours, the oip runtime with a JSON one). It keeps a keep-alive connection open and drops the rest of the body, so a
    # keep-alive client (curl, locust, serving.httpclient) reads the 413. On a "Connection: close"
    # request (urllib's) it closes the socket while the body is still arriving, and the client saw a
    # reset instead: 15 of 15 times with a 16 MiB body; it made this test flaky in CI.
    with Session(served["url"], auth_header(served), timeout=60) as session:
        for _ in range(3):
            answer = session.request("POST", "/predictions/digits", b"\0" * (MAX_REQUEST_SIZE + 1),
                                     {"Content-Type": "image/png"})
            assert answer.status == 413, answer
    assert_serves(served)


def test_one_bad_request_in_a_batch_does_not_fail_the_others(served):
    images, _ = heldout_digits(3, seed=4)
    bodies = [encode_png(x) for x in images] + [b"not an image at all"]
    for _attempt in range(5):  # batching depends on arrival times; retry until one batch held >1
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(lambda b: post(served, "digits", b, "image/png"), bodies))
        assert [r[0] for r in results] == [200, 200, 200, 415], [r[1] for r in results]
        assert results[3][1]["type"] == "not_an_image"
        if int(results[3][2].get("x-batch-size", "1")) > 1:
            break
    else:
        pytest.fail("the bad request never shared a batch with good ones (X-Batch-Size stayed 1)")
    assert_serves(served)


def _rejected_not_an_image(served) -> tuple[float, str]:
    answer = request("GET", served["metrics"] + "/metrics")
    assert answer.status == 200, answer
    text = answer.body.decode()
    series = 'RejectedInputs{ModelName="digits",Level="Model",Reason="not_an_image"'
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series)]
    return sum(values), text


def test_metrics_and_operations(served):
    before, _ = _rejected_not_an_image(served)
    assert post(served, "digits", b"not an image at all", "image/png")[0] == 415
    assert post(served, "digits", encode_png(heldout_digits(1, seed=5)[0][0]), "image/png")[0] == 200
    deadline = time.monotonic() + 10  # the frontend takes the handler's metrics from its log stream
    while (after := _rejected_not_an_image(served))[0] < before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    count, text = after
    assert count == before + 1
    for name in ("DecodeTime_count", "PreprocessTime_count", "InferenceTime_count"):
        assert f'{name}{{ModelName="digits"' in text
    if served["runtime"] == "oip":  # no management API at all: its routes are unknown on every port
        for base in (served["url"], served["metrics"]):
            answer = request("POST", base + "/models?url=digits.mar", headers=auth_header(served))
            assert answer.status == 404 and answer.json()["code"] == 404, answer
        return
    # registration API off; management answers on loopback
    auth = {"Authorization": f"Bearer {served['management_token']}"}
    answer = request("POST", served["management"] + "/models?url=digits.mar", headers=auth)
    assert answer.status == 405, answer
    answer = request("GET", served["management"] + "/models", headers=auth)
    assert answer.status == 200, answer
    assert {m["modelName"] for m in answer.json()["models"]} == {"digits", "cifarnet", "tinyq"}


# --------------------------------------------------------------------------------------------------
# the handler's initialize() in-process, with TorchServe's Context and a real exported variant
# --------------------------------------------------------------------------------------------------
def _context(model_dir: Path, variant: str):
    from ts.context import Context, RequestProcessor

    ctx = Context("digits", str(model_dir), {}, 1, None, "0.12.0",
                  model_yaml_config={"handler": {"variant_cpu": variant}})
    ctx.request_processor = [RequestProcessor({})]
    return ctx


@pytest.mark.parametrize("variant", ["onnx-fp32", "onnx-int8"])
def test_initialize_loads_the_variant_and_answers(serve_artifacts, variant):
    from serving.handler import ClassifierHandler

    artifacts, _ = serve_artifacts
    ctx = _context(artifacts / "digits", variant)
    handler = ClassifierHandler()
    handler.initialize(ctx)
    out = json.loads(handler.handle([{"body": encode_png(heldout_digits(1)[0][0])}], ctx)[0])
    assert ctx.get_response_status(0)[0] == 200 and out["variant"] == variant


def _tampered_copy(artifacts: Path, model_dir: Path, logit_shift: float = 0.0, int8_max_drop=None) -> Path:
    """A copy of the digits artifact with its reference logits shifted (the manifest re-hashed, as a
    wrong export would be) and/or an INT8 gate no INT8 variant can meet on this machine."""
    import shutil

    from export.runtime import Reference, load_reference, read_manifest, save_reference, sha256_file

    shutil.copytree(artifacts / "digits", model_dir)
    manifest = read_manifest(model_dir)
    if logit_shift:
        ref = load_reference(model_dir, manifest)
        path = model_dir / manifest["reference"]["file"]
        save_reference(path, Reference(ref.images, ref.labels, ref.logits + logit_shift))
        manifest["reference"]["sha256"] = sha256_file(path)
    if int8_max_drop is not None:
        manifest["gates"]["int8_max_drop_points"] = int8_max_drop
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    return model_dir


def _answer(handler, ctx) -> dict:
    out = json.loads(handler.handle([{"body": encode_png(heldout_digits(1)[0][0])}], ctx)[0])
    assert ctx.get_response_status(0)[0] == 200
    return out


def test_initialize_falls_back_when_int8_fails_its_gate_on_this_machine(serve_artifacts, tmp_path, caplog):
    from serving.handler import ClassifierHandler

    model_dir = _tampered_copy(serve_artifacts[0], tmp_path / "digits", int8_max_drop=-1000.0)
    handler, ctx = ClassifierHandler(), _context(model_dir, "onnx-int8")
    with caplog.at_level("WARNING", logger="serving.handler"):
        handler.initialize(ctx)
    assert _answer(handler, ctx)["variant"] == "onnx-fp32"  # the answer names what served
    lines = [r.getMessage() for r in caplog.records if "reference check failed" in r.getMessage()]
    assert len(lines) == 1 and "onnx-int8 on cpu" in lines[0] and "logical CPUs" in lines[0]
    assert "points below eager fp32" in lines[0] and "falling back" in lines[0]


def test_initialize_falls_back_when_the_reference_logits_disagree(serve_artifacts, tmp_path):
    """Logits 0.01 off: argmax (so INT8's accuracy gate) unchanged, fp32's atol gate failed."""
    from serving.handler import ClassifierHandler

    model_dir = _tampered_copy(serve_artifacts[0], tmp_path / "digits", logit_shift=0.01)
    handler, ctx = ClassifierHandler(), _context(model_dir, "onnx-fp32")
    handler.initialize(ctx)
    assert _answer(handler, ctx)["variant"] == "onnx-int8"


def test_no_variant_passing_its_reference_check_is_a_fatal_load_error(serve_artifacts, tmp_path):
    from export.runtime import SelfCheckError
    from serving.handler import ClassifierHandler
    from serving.server import FATAL_LOAD_ERRORS

    model_dir = _tampered_copy(serve_artifacts[0], tmp_path / "digits", logit_shift=0.01, int8_max_drop=-1000.0)
    with pytest.raises(SelfCheckError, match="onnx-fp32 on cpu: top-1 agreement .*max .logit diff. 0.01.*; "
                                             "onnx-int8 on cpu: accuracy"):
        ClassifierHandler().initialize(_context(model_dir, "onnx-fp32"))
    assert "SelfCheckError" in FATAL_LOAD_ERRORS  # the server stops waiting and prints the cause


def test_archive_packs_the_reference_batch_and_an_fp32_fallback(serve_artifacts, tmp_path):
    import zipfile

    from export.runtime import read_manifest
    from serving.archive import ArchiveConfig, build_archive, packed_variants

    manifest = read_manifest(serve_artifacts[0] / "digits")
    assert packed_variants(manifest, "onnx-int8", None) == ["onnx-int8", "onnx-fp32"]  # INT8 never alone
    assert packed_variants(manifest, "onnx-fp32", None) == ["onnx-fp32"]
    mar = build_archive(ArchiveConfig(run="digits", artifacts_dir=str(serve_artifacts[0]),
                                      model_store=str(tmp_path), variant_cpu="onnx-int8"), log=lambda _: None)
    names = set(zipfile.ZipFile(mar).namelist())
    assert {"manifest.json", "reference.npz", "onnx-int8.onnx", "onnx-fp32.onnx"} <= names


def test_initialize_refuses_a_tampered_variant(serve_artifacts, tmp_path):
    import shutil

    from export.runtime import IntegrityError
    from serving.handler import ClassifierHandler

    artifacts, _ = serve_artifacts
    model_dir = tmp_path / "digits"
    shutil.copytree(artifacts / "digits", model_dir)
    data = bytearray((model_dir / "onnx-fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_dir / "onnx-fp32.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 mismatch.*make archive RUN=digits"):
        ClassifierHandler().initialize(_context(model_dir, "onnx-fp32"))
