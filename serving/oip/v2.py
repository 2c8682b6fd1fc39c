"""Open Inference Protocol (KServe v2) documents the runtime adds around the handler.

The handler already parses v2 JSON requests and writes v2 answers (``serving.protocol``). What lives
here is what a v2 *server* needs beyond that: the binary tensor extension (a JSON header followed by
raw tensor bytes, ``Inference-Header-Content-Length``), the requested-outputs selection, server and
model metadata, and the tensor <-> bytes conversions gRPC's ``raw_*_contents`` share with it.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from serving.core import InputError, clip
from serving.protocol import V2_OUTPUTS

SERVER_NAME = "visionpipe-oip"
EXTENSIONS = ("binary_tensor_data",)
HEADER_LENGTH = "inference-header-content-length"
# v2 datatypes with a fixed-size element (BYTES is length-prefixed)
NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def split_bytes(raw: bytes, where: str) -> list[bytes]:
    """A BYTES tensor's binary form (each element: 4-byte little-endian length, then the bytes)."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InputError(400, "bad_tensor", f"{where}: a BYTES element's length is cut short")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise InputError(400, "bad_tensor", f"{where}: a BYTES element says {n} bytes, fewer follow")
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def join_bytes(items: list) -> bytes:
    parts = []
    for x in items:
        b = x if isinstance(x, bytes) else str(x).encode("utf-8")
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def tensor_from_bytes(datatype: str, raw: bytes, where: str):
    """Raw tensor bytes -> the handler's v2 ``data``: a list of bytes (BYTES) or a flat numpy array."""
    if datatype == "BYTES":
        return split_bytes(raw, where)
    dtype = NUMPY.get(datatype)
    if dtype is None:
        raise InputError(400, "bad_request", f"{where}: unknown datatype {clip(datatype)}")
    if len(raw) % np.dtype(dtype).itemsize:
        raise InputError(400, "bad_tensor", f"{where}: {len(raw)} bytes is not a whole number of {datatype}")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))


def tensor_to_bytes(datatype: str, data: list) -> bytes:
    if datatype == "BYTES":
        return join_bytes(data)
    return np.asarray(data, dtype=np.dtype(NUMPY[datatype]).newbyteorder("<")).tobytes()


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise InputError(400, "malformed_json", f"{what} is not valid JSON ({clip(str(e))})") from None


def parse_binary_request(body: bytes, header_length: str) -> dict:
    """A request with the binary tensor extension -> the v2 document with each binary input's data
    filled in (``bytes`` elements for BYTES, a numpy array otherwise)."""
    try:
        n = int(header_length)
    except ValueError:
        raise InputError(
            400, "bad_request", f"Inference-Header-Content-Length must be an integer, got {clip(header_length)}"
        ) from None
    if not 0 < n <= len(body):
        raise InputError(
            400, "bad_request", f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes"
        )
    doc = _json(body[:n], "the inference header")
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InputError(400, "bad_request", 'KServe v2: the inference header needs "inputs"')
    offset = n
    for i, tensor in enumerate(doc["inputs"]):
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            continue
        if type(size) is not int or size < 0 or offset + size > len(body):
            raise InputError(
                400,
                "bad_request",
                f"inputs[{i}].binary_data_size {clip(size)} does not fit the {len(body) - offset} bytes left",
            )
        tensor["data"] = tensor_from_bytes(tensor.get("datatype"), body[offset : offset + size], f"inputs[{i}]")
        offset += size
    if offset != len(body):
        raise InputError(400, "bad_request", f"{len(body) - offset} bytes after the last binary input")
    return doc


def requested_outputs(doc: Any) -> tuple[dict[str, bool] | None, bool]:
    """({output name: binary?} the request lists, or None for all; binary default for unlisted)."""
    if not isinstance(doc, dict):
        return None, False
    raw = doc.get("parameters")
    params = raw if isinstance(raw, dict) else {}
    default_binary = params.get("binary_data_output") is True
    outputs = doc.get("outputs")
    if not isinstance(outputs, list):
        return None, default_binary
    chosen = {}
    for o in outputs:
        if isinstance(o, dict) and isinstance(o.get("name"), str):
            raw = o.get("parameters")
            p = raw if isinstance(raw, dict) else {}
            chosen[o["name"]] = p.get("binary_data", default_binary) is True
    return chosen, default_binary


def shape_answer(answer: dict, chosen: dict[str, bool] | None, default_binary: bool) -> tuple[bytes, int | None]:
    """The handler's v2 answer -> (body, JSON header length when binary outputs follow, else None)."""
    outputs = answer.get("outputs", [])
    if chosen is not None:
        unknown = sorted(set(chosen) - {o["name"] for o in outputs})
        if unknown:
            raise InputError(
                400,
                "bad_request",
                f"KServe v2: unknown output(s) {clip(unknown)}; this model has {[o['name'] for o in outputs]}",
            )
        outputs = [o for o in outputs if o["name"] in chosen]
    blobs = []
    shaped = []
    for o in outputs:
        binary = chosen[o["name"]] if chosen is not None else default_binary
        if binary:
            blob = tensor_to_bytes(o["datatype"], o["data"])
            blobs.append(blob)
            o = {k: v for k, v in o.items() if k != "data"}
            o["parameters"] = {**o.get("parameters", {}), "binary_data_size": len(blob)}
        shaped.append(o)
    header = json.dumps({**answer, "outputs": shaped}).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def server_metadata(version: str) -> dict:
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, version: str, handler) -> dict:
    """Inputs and outputs from the model's contract (our handler); a stock handler declares none."""
    core = getattr(handler, "core", None)
    doc: dict[str, Any] = {
        "name": name,
        "versions": [version],
        "platform": "torchserve_handler",
        "inputs": [],
        "outputs": [],
    }
    if core is None:
        return doc
    c, h, w = core.contract.input_shape
    doc["inputs"] = [
        {"name": "images", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "UINT8", "shape": [-1, c, h, w]},
    ]
    doc["outputs"] = [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in V2_OUTPUTS]
    doc["parameters"] = {
        "variant": handler.info.variant,
        "device": handler.info.device,
        "classes": list(core.contract.class_names),
        "inputs": "send exactly one of the inputs: encoded images (BYTES) or pixels (UINT8)",
    }
    return doc


def with_error_key(body: bytes) -> bytes:
    """An error answer on a v2 route: the protocol's ``{"error": message}`` beside our code/type/message."""
    try:
        doc = json.loads(body)
    except ValueError:
        return json.dumps({"error": body.decode("utf-8", "replace")[:400]}).encode()
    if isinstance(doc, dict) and "error" not in doc:
        doc["error"] = str(doc.get("message", ""))
        return json.dumps(doc).encode()
    return body
