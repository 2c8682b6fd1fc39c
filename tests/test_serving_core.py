"""Unit tests of the inference core, the wire protocol and the handler, without TorchServe running.

The model is a fake runner (its logits are a function of the mean pixel, so a test can tell what the
model saw); the handler gets TorchServe's own ``Context``/``RequestProcessor`` classes. The bad-input
table here is reused by the integration test against a real server.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from serving.core import InferenceCore, InputError, Limits, abstains, decode_image, to_mode, top_k
from serving.protocol import PROTOCOL_V2, ModelInfo, format_response, parse_request
from training.contract import Contract

DIGITS = Contract(28, 28, 1, (0.2,), (0.3,), tuple(str(i) for i in range(10)))
RGB = Contract(32, 32, 3, (0.5,) * 3, (0.25,) * 3, tuple(f"c{i}" for i in range(10)))
SMALL = Limits(max_images=4, max_pixels=1_000_000, max_image_bytes=200_000)


# --------------------------------------------------------------------------------------------------
# image makers shared with test_serving_server.py
# --------------------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def digit_like(size: int = 28, light_on_dark: bool = True) -> Image.Image:
    """A bright square stroke on black (MNIST style), or its negative."""
    a = np.zeros((size, size), np.uint8)
    a[size // 4: 3 * size // 4, size // 3: size // 2] = 255
    return Image.fromarray(a if light_on_dark else 255 - a, "L")


def bad_inputs(limits: Limits) -> dict[str, tuple[bytes, int, str]]:
    """Every malformed or refused image body: name -> (bytes, HTTP status, error type)."""
    side_big = int((limits.max_pixels * 1.2) ** 0.5)  # over the limit, under Pillow's 2x bomb line
    side_bomb = int((limits.max_pixels * 2.5) ** 0.5)
    png = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    jpeg = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    return {
        "empty": (b"", 400, "empty_body"),
        "not_an_image": (b"this is plain text, not an image" * 4, 415, "not_an_image"),
        "truncated_png": (png[: len(png) // 2], 400, "truncated_image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], 400, "truncated_image"),
        # valid signature and header, scrambled pixel data: zlib/CRC errors while decoding
        "corrupt_data": (png[:60] + bytes(255 - b for b in png[60:-12]) + png[-12:], 400, "corrupt_image"),
        # 1-bit images compress ~1000:1: a few KB on the wire, megapixels once decoded
        "over_pixel_limit": (encode(Image.new("1", (side_big, side_big))), 413, "image_too_large"),
        "decompression_bomb": (encode(Image.new("1", (side_bomb, side_bomb))), 413, "decompression_bomb"),
        "over_byte_limit": (np.random.default_rng(2).bytes(limits.max_image_bytes + 1), 413, "file_too_large"),
        "float_tiff": (encode(Image.new("F", (8, 8), 0.5), "TIFF"), 415, "unsupported_mode"),
    }


def exotic_modes() -> dict[str, bytes]:
    """Images in modes that must be converted (not refused)."""
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (10, 10, 20, 20))
    return {
        "png16": encode(Image.fromarray((np.full((20, 20), 40000)).astype(np.uint16))),
        "cmyk_jpeg": encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"),
        "palette_gif": encode(Image.new("P", (20, 20), 3), "GIF"),
        "rgba_png": encode(rgba),
        "la_png": encode(Image.new("LA", (20, 20), (30, 200))),
        "bmp": encode(Image.new("RGB", (20, 20), (9, 99, 199)), "BMP"),
        "webp": encode(Image.new("RGB", (20, 20), (9, 99, 199)), "WEBP"),
        "one_bit": encode(Image.new("1", (20, 20), 1)),
    }


class FakeRunner:
    """Stands in for export.runtime.Runner: logit j is high when the mean pixel is near j * 255 / 9."""

    def __init__(self, contract: Contract) -> None:
        self.contract, self.variant, self.device = contract, "fake-fp32", "cpu"
        self.manifest = {"version": "7"}
        self.calls: list[tuple] = []

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        assert pixels.dtype == np.uint8 and pixels.shape[1:] == self.contract.input_shape
        self.calls.append(pixels.shape)
        mean = pixels.reshape(len(pixels), -1).mean(axis=1) / 255.0 * 9.0  # (N,)
        centers = np.arange(self.contract.num_classes, dtype=np.float32)
        return (-(mean[:, None] - centers[None, :]) ** 2 * 4.0).astype(np.float32)  # (N, K)


# --------------------------------------------------------------------------------------------------
# core
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(bad_inputs(SMALL)))
def test_bad_images_raise_input_error(name):
    data, code, kind = bad_inputs(SMALL)[name]
    core = InferenceCore(FakeRunner(DIGITS), SMALL)
    with pytest.raises(InputError) as err:
        core.to_pixels(data)
    assert (err.value.code, err.value.type) == (code, kind), err.value.message
    assert err.value.message


@pytest.mark.parametrize("name", list(exotic_modes()))
@pytest.mark.parametrize("contract", [DIGITS, RGB], ids=["gray", "rgb"])
def test_exotic_modes_convert_to_contract(name, contract):
    pixels = InferenceCore(FakeRunner(contract), SMALL).to_pixels(exotic_modes()[name], invert="no")
    assert pixels.dtype == np.uint8 and pixels.shape == contract.input_shape


def test_mode_conversions_keep_meaning():
    # 16-bit 40000/65535 -> ~156, not Pillow's clipped 255
    gray16 = decode_image(exotic_modes()["png16"], SMALL)
    assert abs(int(np.asarray(to_mode(gray16, 1)).mean()) - 40000 // 256) <= 1
    # CMYK (0, 255, 255, 0) is red
    assert tuple(np.asarray(to_mode(decode_image(exotic_modes()["cmyk_jpeg"], SMALL), 3))[5, 5]) \
        == pytest.approx((255, 0, 0), abs=3)
    # transparent pixels become white, opaque black stays black
    rgba = np.asarray(to_mode(decode_image(exotic_modes()["rgba_png"], SMALL), 3))
    assert tuple(rgba[0, 0]) == (255, 255, 255) and tuple(rgba[15, 15]) == (0, 0, 0)


def test_exif_orientation_is_applied():
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed: the white half ends up on top
    decoded = decode_image(encode(img, "JPEG", exif=exif), SMALL)
    a = np.asarray(decoded)
    assert decoded.size == (20, 40) and a[:20].mean() > 200 and a[20:].mean() < 50


def test_large_jpeg_decodes_in_draft_mode():
    big = encode(Image.new("RGB", (3000, 2000), (200, 30, 30)), "JPEG")
    img = decode_image(big, Limits(), RGB)
    assert max(img.size) < 3000 and min(img.size) >= 32  # DCT-scaled, still larger than the contract


def test_dark_on_light_digit_is_inverted_automatically():
    core = InferenceCore(FakeRunner(DIGITS), SMALL)
    light_on_dark = core.to_pixels(encode(digit_like(112)))
    dark_on_light = core.to_pixels(encode(digit_like(112, light_on_dark=False)))
    assert np.abs(light_on_dark.astype(int) - dark_on_light.astype(int)).max() <= 2
    kept = core.to_pixels(encode(digit_like(112, light_on_dark=False)), invert="no")
    assert kept.mean() > 128  # "no" keeps the light background
    # RGB contracts are never inverted automatically
    rgb = InferenceCore(FakeRunner(RGB), SMALL).to_pixels(encode(Image.new("RGB", (8, 8), "white")))
    assert rgb.min() == 255


def test_top_k_is_sorted_and_named():
    logits = np.array([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]], np.float32)
    out = top_k(logits, 2, ("a", "b", "c"))
    assert [c["label"] for c in out[0]] == ["b", "c"] and out[1][0]["index"] == 0
    assert out[0][0]["probability"] == pytest.approx(np.exp(3) / (1 + np.exp(3) + np.exp(1)), abs=1e-6)


def test_classify_decodes_resizes_and_ranks_by_brightness_with_a_fake_runner():
    """InferenceCore.classify's own path (decode, resize to the contract, batch, top-k) with a runner
    that ranks by mean brightness; the model and the server are stand-ins, not exercised here."""
    core = InferenceCore(FakeRunner(RGB), SMALL)
    white, black = encode(Image.new("RGB", (50, 70), "white")), encode(Image.new("RGB", (5, 5), "black"))
    out = core.classify([white, black], topk=3)
    assert out[0][0]["label"] == "c9" and out[1][0]["label"] == "c0" and len(out[0]) == 3
    with pytest.raises(InputError, match="topk"):
        core.classify([white], topk=11)


# --------------------------------------------------------------------------------------------------
# protocol
# --------------------------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_parse_raw_multipart_and_instances():
    png = encode(digit_like())
    assert parse_request({"body": png}, DIGITS, SMALL).items == (png,)
    req = parse_request({"file0": png, "file1": png, "topk": b"3"}, DIGITS, SMALL)
    assert len(req.items) == 2 and req.topk == 3
    body = json.dumps({"instances": [{"b64": b64(png)}] * 3, "parameters": {"invert": "no"}}).encode()
    req = parse_request({"body": body}, DIGITS, SMALL, {"body": "application/json"})
    assert req.items == (png,) * 3 and req.invert == "no"
    # already decoded by TorchServe (decode_input_request=true) works too
    assert parse_request({"body": {"instances": [{"b64": b64(png)}]}}, DIGITS, SMALL).items == (png,)


def test_options_from_headers_fields_and_json():
    png = encode(digit_like())
    assert parse_request({"body": png}, DIGITS, SMALL, headers={"x-topk": "2", "x-invert": "no"}).topk == 2
    assert parse_request({"f": png, "topk": b"4"}, DIGITS, SMALL, headers={"x-topk": "2"}).topk == 4
    body = json.dumps({"instances": [{"b64": b64(png)}], "parameters": {"topk": 1}}).encode()
    req = parse_request({"body": body}, DIGITS, SMALL, headers={"x-topk": "2", "x-invert": "yes"})
    assert (req.topk, req.invert) == (1, "yes")


def test_min_confidence_is_a_number_from_0_to_1_wherever_it_comes_from():
    png = encode(digit_like())
    assert parse_request({"body": png}, DIGITS, SMALL).min_confidence is None  # the model's default
    assert parse_request({"body": png}, DIGITS, SMALL, headers={"x-min-confidence": " 0.5 "}).min_confidence == 0.5
    assert parse_request({"f": png, "min_confidence": b"1"}, DIGITS, SMALL).min_confidence == 1.0
    body = json.dumps({"instances": [{"b64": b64(png)}], "parameters": {"min_confidence": 0}}).encode()
    assert parse_request({"body": body}, DIGITS, SMALL, headers={"x-min-confidence": "0.9"}).min_confidence == 0
    for bad in ("1.01", "-0.1", "nan", "inf", "0x1", "", "1e999"):
        with pytest.raises(InputError, match="min_confidence") as err:
            parse_request({"body": png}, DIGITS, SMALL, headers={"x-min-confidence": bad})
        assert err.value.code == 400
    for bad in ("0.5", True, None, [0.5], {"v": 1}, 2):  # JSON: a number, not a string or a bool
        body = json.dumps({"instances": [{"b64": b64(png)}], "parameters": {"min_confidence": bad}}).encode()
        if bad is None:  # null = not given
            assert parse_request({"body": body}, DIGITS, SMALL).min_confidence is None
            continue
        with pytest.raises(InputError, match="min_confidence"):
            parse_request({"body": body}, DIGITS, SMALL)


def test_abstain_flags_in_both_protocols():
    rows = top_k(np.array([[4.0, 0.0, 0.0], [1.0, 1.0, 0.9]]), 2, ("a", "b", "c"))
    assert abstains(rows, 0.0) == [False, False] and abstains(rows, 1.0) == [True, True]
    assert abstains(rows, 0.5) == [False, True]
    info = ModelInfo("m", "1", "onnx-fp32", "cpu")
    png = encode(digit_like())
    doc = format_response(parse_request({"body": png}, DIGITS, SMALL), info, rows, abstains(rows, 0.5))
    assert doc["abstain"] == [False, True] and doc["predictions"] == rows
    v2 = {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": [b64(png)] * 2}]}
    out = format_response(parse_request({"body": json.dumps(v2).encode()}, DIGITS, SMALL), info, rows,
                          abstains(rows, 0.5))
    assert out["outputs"][-1] == {"name": "abstain", "datatype": "BOOL", "shape": [2], "data": [False, True]}


def test_form_encoded_body_is_refused_with_the_fix():
    with pytest.raises(InputError, match="curl -T") as err:
        parse_request({}, DIGITS, SMALL, headers={"content-type": "application/x-www-form-urlencoded"})
    assert (err.value.code, err.value.type) == (415, "form_encoded_body")


def test_parse_kserve_v2_bytes_and_uint8():
    png = encode(digit_like())
    doc = {"id": "r1", "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                   "data": [b64(png), b64(png)]}]}
    req = parse_request({"body": json.dumps(doc).encode()}, DIGITS, SMALL)
    assert req.protocol == PROTOCOL_V2 and req.id == "r1" and req.items == (png, png)
    pixels = np.arange(2 * 28 * 28, dtype=np.int64) % 256
    doc = {"inputs": [{"name": "pixels", "shape": [2, 1, 28, 28], "datatype": "UINT8",
                       "data": pixels.tolist()}]}
    req = parse_request({"body": json.dumps(doc).encode()}, DIGITS, SMALL)
    assert np.array_equal(np.stack(req.items).reshape(-1), pixels.astype(np.uint8))


def bad_requests(limits: Limits) -> dict[str, tuple[dict, int, str]]:
    """Malformed request bodies: name -> (TorchServe parameters, HTTP status, error type)."""
    png = encode(digit_like())
    many = json.dumps({"instances": [{"b64": b64(png)}] * (limits.max_images + 1)}).encode()
    v2_wrong = {"inputs": [{"name": "x", "shape": [1, 3, 5, 5], "datatype": "UINT8", "data": [0] * 75}]}
    return {
        "no_parameters": ({}, 400, "empty_body"),
        "malformed_json": ({"body": b'{"instances": [{"b64": '}, 400, "malformed_json"),
        "deep_json": ({"body": b"[" * 100_000}, 400, "malformed_json"),
        "bad_base64": ({"body": b'{"instances": [{"b64": "not base64 !!"}]}'}, 400, "bad_base64"),
        "unknown_json": ({"body": b'{"images": []}'}, 400, "bad_request"),
        "instance_not_object": ({"body": b'{"instances": ["abc"]}'}, 400, "bad_request"),
        "empty_instances": ({"body": b'{"instances": []}'}, 400, "empty_body"),
        "too_many_images": ({"body": many}, 413, "too_many_images"),
        "too_many_parts": ({f"f{i}": png for i in range(limits.max_images + 1)}, 413, "too_many_images"),
        "bad_topk": ({"body": png, "topk": b"zero"}, 400, "bad_parameter"),
        "bad_invert": ({"body": png, "invert": b"maybe"}, 400, "bad_parameter"),
        "v2_bad_datatype": ({"body": json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                                             "data": [1.0]}]}).encode()}, 400, "bad_request"),
        "v2_wrong_shape": ({"body": json.dumps(v2_wrong).encode()}, 400, "bad_tensor"),
    }


@pytest.mark.parametrize("name", list(bad_requests(SMALL)))
def test_bad_requests_raise_input_error(name):
    params, code, kind = bad_requests(SMALL)[name]
    with pytest.raises(InputError) as err:
        parse_request(params, DIGITS, SMALL)
    assert (err.value.code, err.value.type) == (code, kind), err.value.message


# --------------------------------------------------------------------------------------------------
# handler, with TorchServe's own Context
# --------------------------------------------------------------------------------------------------
class RecordingMetrics:
    """Collects what the handler emits (TorchServe's metric cache API: add_metric_to_cache -> metric)."""

    def __init__(self) -> None:
        self.emitted: list[tuple[str, float, list]] = []

    def add_metric_to_cache(self, name, unit, dimension_names, metric_type):
        outer = self

        class Metric:
            def add_or_update(self, value, dimension_values, request_id=""):
                assert len(dimension_values) == len(dimension_names)
                outer.emitted.append((name, value, dimension_values))
        return Metric()


def make_handler(contract: Contract = DIGITS):
    from serving.handler import ClassifierHandler

    metrics = RecordingMetrics()
    handler = ClassifierHandler()
    handler.setup(FakeRunner(contract), SMALL, "digits", metrics)
    return handler, metrics


def make_context(batch: list[dict]):
    from ts.context import Context, RequestProcessor

    ctx = Context("digits", "/nonexistent", {}, len(batch), None, "0.12.0")
    ctx.request_processor = [RequestProcessor({"X-TopK": "5"}) for _ in batch]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(batch))}
    return ctx


def test_handler_isolates_bad_requests_in_a_batch():
    handler, metrics = make_handler()
    png = encode(digit_like())
    batch = [{"body": png}, {"body": b"garbage bytes"}, {"body": json.dumps(
        {"instances": [{"b64": b64(png)}, {"b64": b64(png)}]}).encode()}, {"body": b""}]
    ctx = make_context(batch)
    out = handler.handle(batch, ctx)
    assert len(out) == 4
    statuses = [ctx.get_response_status(i)[0] for i in range(4)]
    assert statuses == [200, 415, 200, 400]
    ok, err = json.loads(out[2]), json.loads(out[1])
    assert ok["model"] == "digits" and ok["version"] == "7" and ok["variant"] == "fake-fp32"
    assert ok["device"] == "cpu" and len(ok["predictions"]) == 2 and len(ok["predictions"][0]) == 5
    assert set(err) == {"code", "type", "message"} and err["type"] == "not_an_image"
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(4))
    assert ctx.get_response_headers(0)["X-Batch-Size"] == "4"
    assert handler.core.runner.calls == [(3, 1, 28, 28)]  # the good images went through in one call
    rejected = [(v, d[-1]) for n, v, d in metrics.emitted if n == "RejectedInputs"]
    assert sorted(rejected) == [(1, "empty_body"), (1, "not_an_image")]
    assert {n for n, _, _ in metrics.emitted} >= {"DecodeTime", "PreprocessTime", "InferenceTime"}


def test_handler_v2_response_shape():
    handler, _ = make_handler()
    png = encode(digit_like())
    doc = {"id": "abc", "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                    "data": [b64(png)] * 2}], "parameters": {"topk": 3}}
    batch = [{"body": json.dumps(doc).encode()}]
    out = json.loads(handler.handle(batch, make_context(batch))[0])
    assert out["id"] == "abc" and out["model_name"] == "digits"
    assert [o["name"] for o in out["outputs"]] == ["label", "index", "probability", "abstain"]
    assert all(o["shape"] == [2, 3] and len(o["data"]) == 6 for o in out["outputs"][:3])
    assert out["outputs"][3] == {"name": "abstain", "datatype": "BOOL", "shape": [2], "data": [False, False]}


def test_handler_config_from_yaml():
    from serving.handler import HandlerConfig

    cfg = HandlerConfig.from_yaml({"handler": {"variant_cpu": "onnx-int8", "threads": 2, "max_images": 8}})
    assert cfg.variant_cpu == "onnx-int8" and cfg.threads == 2 and cfg.limits.max_images == 8
    with pytest.raises(ValueError, match="unknown keys"):
        HandlerConfig.from_yaml({"handler": {"max_imgs": 8}})
    with pytest.raises(ValueError, match="not one of"):
        HandlerConfig.from_yaml({"handler": {"variant_cpu": "onnx-fp64"}})
    assert HandlerConfig.from_yaml({"handler": {"min_confidence": 0.6}}).min_confidence == 0.6
    assert HandlerConfig.from_yaml({}).min_confidence == 0.0
    with pytest.raises(ValueError, match="min_confidence"):
        HandlerConfig.from_yaml({"handler": {"min_confidence": 1.5}})
    from serving.archive import ArchiveConfig
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_confidence"):
            ArchiveConfig(run="digits", min_confidence=bad)


# --------------------------------------------------------------------------------------------------
# bounded work and bounded answers (the hostile-traffic suite against a real server: test_hostile.py)
# --------------------------------------------------------------------------------------------------
def test_clip_bounds_any_client_value():
    from serving.core import MAX_ECHO, clip

    for value in ("A" * 7_000_000, b"\xff" * 10**6, [1] * 10**6, {"k" * 10**5: [[[[1]]]]}, 10**4000 // 7):
        assert len(clip(value)) <= 2 * MAX_ECHO + 20
    assert clip("ok") == "'ok'"


def test_error_messages_stay_small_whatever_the_request_holds():
    from serving.core import MAX_MESSAGE

    long = "Z" * 1_000_000
    png = encode(digit_like())
    bodies = [
        {"body": png, "topk": long.encode()}, {"body": png, "invert": long.encode()},
        {"body": json.dumps({"instances": [{"b64": b64(png)}], "parameters": {"topk": long}}).encode()},
        {"body": json.dumps({"inputs": [{"name": long, "shape": [1], "datatype": "BYTES", "data": ["x"]}]}).encode()},
        {"body": json.dumps({"id": long, "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                                    "data": [b64(png)]}]}).encode()},
        {"body": json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": long, "data": []}]}).encode()},
        {"body": json.dumps({"inputs": [{"name": "x", "shape": [1] * 10**5, "datatype": "UINT8", "data": []}]}).encode()},
        {long: b""},
    ]
    for params in bodies:
        with pytest.raises(InputError) as err:
            parse_request(params, DIGITS, SMALL, headers={"x-topk": long})
        assert len(err.value.message) <= MAX_MESSAGE and long[:200] not in err.value.message


@pytest.mark.parametrize("data,kind", [([1.9] * 784, "float"), ([True] * 784, "bool"), (["7"] * 784, "str"),
                                       ([None] * 784, "NoneType"), ([0] * 783 + [1.0], "float")])
def test_v2_uint8_accepts_only_json_integers(data, kind):
    doc = {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": data}]}
    with pytest.raises(InputError, match=kind) as err:
        parse_request({"body": json.dumps(doc).encode()}, DIGITS, SMALL)
    assert err.value.code == 400


def test_v2_uint8_range_count_and_nesting():
    ok = np.arange(784) % 256
    for data in (ok.tolist(), ok.reshape(1, 1, 28, 28).tolist(), ok.reshape(28, 28).tolist()):
        doc = {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": data}]}
        req = parse_request({"body": json.dumps(doc).encode()}, DIGITS, SMALL)
        assert np.array_equal(req.items[0].reshape(-1), ok)
    for data in ([256] * 784, [-1] * 784, [0] * 783, [0] * 785, [[0] * 392, 0], [10**30] * 784):
        doc = {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": data}]}
        with pytest.raises(InputError):
            parse_request({"body": json.dumps(doc).encode()}, DIGITS, SMALL)


@pytest.mark.parametrize("params", [{"topk": "3"}, {"topk": 2.0}, {"topk": True}, {"topk": [3]}, {"invert": 1}])
def test_json_parameters_are_typed(params):
    body = json.dumps({"instances": [{"b64": b64(encode(digit_like()))}], "parameters": params}).encode()
    with pytest.raises(InputError, match="must be"):
        parse_request({"body": body}, DIGITS, SMALL)


def _bomb(fmt: str, side: int) -> bytes:
    img = Image.new("1" if fmt == "PNG" else "L", (side, side), 0)
    return encode(img.convert("P") if fmt == "GIF" else img, fmt,
                  **({"lossless": True} if fmt == "WEBP" else {"compression": "tiff_adobe_deflate"}
                     if fmt == "TIFF" else {}))


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_bomb_like_files_are_refused_from_their_header(fmt, monkeypatch):
    from serving import core as core_module

    limits = Limits(max_pixels=4_000_000, max_image_bytes=10**7)
    data = _bomb(fmt, 1900)
    if fmt == "BMP":  # uncompressed: never bomb-like, admitted
        assert InferenceCore(FakeRunner(DIGITS), limits).to_pixels(data).shape == (1, 28, 28)
        return
    monkeypatch.setattr(core_module.images, "load", lambda img: pytest.fail("decoded a refused image"))
    with pytest.raises(InputError) as err:
        InferenceCore(FakeRunner(DIGITS), limits).open(data)
    assert (err.value.code, err.value.type) == (413, "bomb_like_image")


def test_request_pixel_budget_counts_jpeg_at_its_draft_size():
    limits = Limits(max_pixels=4_000_000, max_request_pixels=2_000_000, max_image_bytes=10**7)
    core = InferenceCore(FakeRunner(RGB), limits)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 1000, 3), np.uint8))
    png, jpeg = encode(noisy), encode(noisy, "JPEG")
    assert core.open_request([png, png])[1] == 2_000_000
    with pytest.raises(InputError) as err:
        core.open_request([png, png, png])
    assert (err.value.code, err.value.type) == (413, "request_too_large")
    assert core.open_request([jpeg] * 3)[1] < 3 * 1_000_000 // 16  # decoded at 1/8 per side


def test_handler_admits_cheapest_first_within_the_batch_budget():
    from serving.handler import ClassifierHandler

    limits = Limits(max_pixels=4_000_000, max_request_pixels=1_500_000, max_batch_pixels=2_100_000,
                    max_image_bytes=10**7)
    handler = ClassifierHandler()
    handler.setup(FakeRunner(DIGITS), limits, "digits", None)
    a = np.random.default_rng(1).integers(0, 255, (1000, 1000), np.uint8)
    big, small = encode(Image.fromarray(a)), encode(digit_like())
    batch = [{"body": big}, {"body": big}, {"body": small}, {"body": big}]
    ctx = make_context(batch)
    out = [json.loads(x) for x in handler.handle(batch, ctx)]
    statuses = [ctx.get_response_status(i)[0] for i in range(4)]
    assert statuses.count(200) == 3 and statuses[2] == 200  # the small one first, then two of 1 MP
    assert statuses.count(503) == 1 and out[statuses.index(503)]["type"] == "batch_budget_spent"


def test_a_failing_model_call_answers_500_and_the_handler_survives():
    handler, _ = make_handler()
    calls = []

    def broken(pixels):
        calls.append(pixels.shape)
        raise RuntimeError("onnxruntime: " + "x" * 100_000)

    handler.core.runner = type("Broken", (), {"contract": DIGITS, "__call__": lambda self, p: broken(p)})()
    batch = [{"body": encode(digit_like())}, {"body": b"junk"}]
    ctx = make_context(batch)
    out = handler.handle(batch, ctx)
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [500, 415]
    assert json.loads(out[0])["type"] == "internal_error" and len(out[0]) < 300 and calls


def test_an_answer_over_max_response_bytes_becomes_a_small_413():
    from serving.handler import ClassifierHandler

    names = tuple(f"class-{i}-" + "n" * 200 for i in range(100))
    wide = Contract(28, 28, 1, (0.2,), (0.3,), names)
    handler = ClassifierHandler()
    handler.setup(FakeRunner(wide), Limits(max_images=4, max_response_bytes=20_000), "wide", None)
    body = json.dumps({"instances": [{"b64": b64(encode(digit_like()))}] * 4, "parameters": {"topk": 100}})
    batch = [{"body": body.encode()}]
    ctx = make_context(batch)
    out = handler.handle(batch, ctx)[0]
    assert ctx.get_response_status(0)[0] == 413 and json.loads(out)["type"] == "response_too_large"
    assert len(out) < 400
def test_light_background_is_the_ring_median_above_mid_grey():
    from serving.core import has_light_background

    rng = np.random.default_rng(0)
    for shape in [(28, 28), (8, 8), (5, 9), (1, 1)]:
        for _ in range(300):  # values around 127.5, so that ties and the two middle values matter
            a = rng.integers(120, 136, shape, dtype=np.uint8)
            r = max(1, min(shape) // 10)
            ring = np.concatenate([a[:r].ravel(), a[-r:].ravel(), a[:, :r].ravel(), a[:, -r:].ravel()])
            assert has_light_background(Image.fromarray(a, "L")) == (float(np.median(ring)) > 127.5)


# --------------------------------------------------------------------------------------------------
# each limit admits its exact value and refuses one more (bench/mutation_check.py flips every
# comparison of these checks and runs this file: each flip must fail a test)
# --------------------------------------------------------------------------------------------------
def _refused(call, *args) -> tuple[int, str]:
    with pytest.raises(InputError) as err:
        call(*args)
    return err.value.code, err.value.type


def test_clip_and_messages_cut_only_past_their_limit():
    from serving.core import MAX_ECHO, MAX_MESSAGE, clip

    # the length note only past MAX_ECHO characters (reprlib may shorten either)
    assert not clip("e" * MAX_ECHO).endswith("long)") and clip("e" * 5) == repr("e" * 5)
    assert clip("e" * (MAX_ECHO + 1)).endswith(f"... ({MAX_ECHO + 1} long)")
    assert InputError(400, "x", "m" * MAX_MESSAGE).message == "m" * MAX_MESSAGE
    cut = InputError(400, "x", "m" * (MAX_MESSAGE + 1)).message
    assert len(cut) == MAX_MESSAGE and cut.endswith("...")


def test_limits_take_any_positive_integer_and_nothing_else():
    fields = list(Limits.__dataclass_fields__)
    assert Limits(**dict.fromkeys(fields, 1)).max_images == 1
    for bad in (0, -1, 2.0, "3", None):
        with pytest.raises(ValueError, match="positive integers"):
            Limits(max_images=bad)


def test_image_bytes_and_pixels_are_admitted_up_to_their_limit():
    png = encode(Image.new("L", (30, 20), 255))  # 600 pixels
    core = InferenceCore(FakeRunner(DIGITS), Limits(max_image_bytes=len(png), max_pixels=600))
    assert core.open(png).size == (30, 20)
    assert _refused(InferenceCore(FakeRunner(DIGITS), Limits(max_image_bytes=len(png) - 1)).open,
                    png) == (413, "file_too_large")
    assert _refused(InferenceCore(FakeRunner(DIGITS), Limits(max_pixels=599)).open, png) == (413, "image_too_large")
    for size in ((1, 5), (5, 1), (1, 1)):  # one pixel wide or high is an image
        assert core.open(encode(Image.new("L", size))).size == size


def test_the_bomb_ratio_applies_above_ratio_free_pixels_and_admits_its_exact_value():
    from serving.core import RATIO_FREE_PIXELS, open_image

    side = int(RATIO_FREE_PIXELS ** 0.5)
    assert side * side == RATIO_FREE_PIXELS
    assert open_image(encode(Image.new("1", (side, side))), Limits()).size == (side, side)  # ~200 bytes
    taller = encode(Image.new("1", (side, side + 1)))
    assert _refused(open_image, taller, Limits()) == (413, "bomb_like_image")
    # exactly max_pixels_per_byte pixels per byte: admitted (bytes after IEND are never read)
    pixels = side * (side + 1)
    padded = taller + bytes(4 * (side + 1) - len(taller))
    per_byte = pixels // len(padded)
    assert per_byte * len(padded) == pixels
    assert open_image(padded, Limits(max_pixels_per_byte=per_byte)).size == (side, side + 1)
    assert _refused(open_image, padded, Limits(max_pixels_per_byte=per_byte - 1)) == (413, "bomb_like_image")


def test_topk_takes_1_to_the_number_of_classes():
    core = InferenceCore(FakeRunner(DIGITS), SMALL)
    assert (core.check_topk(1), core.check_topk(10), core.check_topk(None)) == (1, 10, SMALL.default_topk)
    for k in (0, 11):
        assert _refused(core.check_topk, k) == (400, "bad_parameter")


def test_min_confidence_takes_0_and_1_and_nothing_outside():
    from serving.core import check_min_confidence

    assert (check_min_confidence(0.0), check_min_confidence(1.0)) == (0.0, 1.0)
    for bad in (-1e-9, 1.0 + 1e-9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_confidence"):
            check_min_confidence(bad)


def test_pixels_must_be_uint8_at_the_contract_shape():
    core = InferenceCore(FakeRunner(DIGITS), SMALL)
    good = np.zeros(DIGITS.input_shape, np.uint8)
    assert core.open(good) is good
    assert _refused(core.open, good.astype(np.int16)) == (400, "bad_tensor")
    assert _refused(core.open, np.zeros((1, 28, 27), np.uint8)) == (400, "bad_tensor")


def test_a_request_may_decode_exactly_max_request_pixels():
    png = encode(Image.new("L", (30, 20)))  # 600 pixels each
    core = InferenceCore(FakeRunner(DIGITS), Limits(max_request_pixels=1200))
    assert core.open_request([png, png])[1] == 1200
    assert _refused(core.open_request, [png, png, png]) == (413, "request_too_large")
