"""Property-based fuzzing of the request parser and the image decoder, in-process (hypothesis).

Whatever the bytes, parameters and headers, ``parse_request`` and ``InferenceCore.to_pixels`` either
succeed or raise ``InputError`` (a 4xx with a short message); any other exception would be a 500 or,
before the handler's catch-all, a failed batch. The default profile is derandomized (the same
thousands of cases in every CI run); ``HYPOTHESIS_PROFILE=fuzz`` runs many more, randomly.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.core import MAX_MESSAGE, InferenceCore, InputError, Limits
from serving.protocol import parse_request
from test_serving_core import DIGITS, RGB, FakeRunner

settings.register_profile("ci", max_examples=1500, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=50_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LIMITS = Limits(max_images=4, max_pixels=250_000, max_request_pixels=500_000, max_batch_pixels=10**6,
                max_image_bytes=100_000)


def _check(err: InputError) -> None:
    assert 400 <= err.code < 500 and err.type and 0 < len(err.message) <= MAX_MESSAGE


# ---- the parser --------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30)
shapes = st.lists(st.integers(-2, 30) | st.booleans() | st.text(max_size=2), max_size=5) | json_values
v2_docs = st.fixed_dictionaries(
    {"inputs": st.lists(st.fixed_dictionaries({
        "name": st.text(max_size=10) | json_values,
        "shape": shapes,
        "datatype": st.sampled_from(["BYTES", "UINT8", "FP32", "uint8", ""]) | json_values,
        "data": st.lists(st.integers(-300, 300) | st.booleans() | st.floats(-2, 300) | st.text(max_size=12)
                         | st.lists(st.integers(0, 255), max_size=30), max_size=800) | json_values}),
        max_size=2)},
    optional={"id": st.text(max_size=80) | json_values,
              "parameters": st.dictionaries(st.sampled_from(["topk", "invert", "min_confidence", "x"]), json_values,
                                            max_size=3)
              | json_values})
instance_docs = st.fixed_dictionaries(
    {"instances": st.lists(st.fixed_dictionaries({"b64": st.text(max_size=40) | json_values}) | json_values,
                           max_size=6) | json_values},
    optional={"parameters": st.dictionaries(st.sampled_from(["topk", "invert", "min_confidence"]), json_values,
                                            max_size=3)})
bodies = (st.binary(max_size=300)
          | (v2_docs | instance_docs | json_values).map(lambda d: json.dumps(d).encode()))
params = st.one_of(
    st.fixed_dictionaries({"body": bodies}, optional={"topk": st.binary(max_size=8), "invert": st.binary(max_size=8),
                                                      "min_confidence": st.binary(max_size=8)}),
    st.dictionaries(st.text(max_size=10), st.binary(max_size=50) | st.text(max_size=10), max_size=6))
headers = st.dictionaries(st.sampled_from(["x-topk", "x-invert", "x-min-confidence", "content-type", "x-other"]),
                          st.text(max_size=30), max_size=3)


@given(params=params, headers=headers, rgb=st.booleans())
def test_parse_request_raises_only_input_errors(params, headers, rgb):
    try:
        req = parse_request(params, RGB if rgb else DIGITS, LIMITS, headers=headers)
    except InputError as err:
        _check(err)
        return
    assert 1 <= len(req.items) <= LIMITS.max_images
    assert req.topk is None or isinstance(req.topk, int)
    assert req.min_confidence is None or (type(req.min_confidence) is float and 0.0 <= req.min_confidence <= 1.0)
    assert req.id is None or (isinstance(req.id, str) and len(req.id) <= 64)


# ---- the decoder -------------------------------------------------------------------------------
def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for fmt, mode, kw in [("PNG", "RGBA", {}), ("PNG", "1", {}), ("PNG", "I;16", {}), ("GIF", "P", {}),
                          ("JPEG", "RGB", {"quality": 80}), ("JPEG", "CMYK", {}), ("BMP", "RGB", {}),
                          ("WEBP", "RGB", {"lossless": True}), ("TIFF", "L", {"compression": "tiff_lzw"}),
                          ("TIFF", "F", {})]:
        if mode == "I;16":
            img = Image.fromarray(rng.integers(0, 65535, (12, 9), dtype=np.uint16))
        elif mode == "F":
            img = Image.new("F", (5, 5), 0.5)
        else:
            img = Image.fromarray(rng.integers(0, 255, (12, 9, 3), np.uint8)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "big"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "big" and len(data) > pos + 4:  # a header size field set huge
            data[pos:pos + 4] = b"\x00\x7f\xff\xff"
    return bytes(data)


@given(data=mutated_images() | st.binary(max_size=400), rgb=st.booleans(),
       invert=st.sampled_from(["auto", "yes", "no"]))
def test_decoder_raises_only_input_errors(data, rgb, invert):
    contract = RGB if rgb else DIGITS
    try:
        pixels = InferenceCore(FakeRunner(contract), LIMITS).to_pixels(data, invert)
    except InputError as err:
        _check(err)
        return
    assert pixels.dtype == np.uint8 and pixels.shape == contract.input_shape


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_every_fuzz_seed_is_a_valid_image_or_a_clear_refusal(seed):
    """The mutations start from real files: each seed itself decodes (the float TIFF is refused)."""
    try:
        InferenceCore(FakeRunner(RGB), LIMITS).to_pixels(SEEDS[seed])
    except InputError as err:
        assert err.type == "unsupported_mode"
