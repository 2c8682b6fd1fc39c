"""Request bodies in, response bodies out: the wire formats the server speaks.

Requests (one TorchServe request = one dict of parameters, see ``parse_request``):
  * raw image bytes as the body (``curl -T cat.png`` or ``--data-binary @cat.png``);
  * multipart/form-data, one image per file part (each part needs its own field name: TorchServe keeps
    only the last of several parts sharing a name);
  * JSON ``{"instances": [{"b64": "<base64>"}, ...], "parameters": {"topk": 3}}``;
  * KServe v2 / Open Inference Protocol JSON (``POST /v2/models/<name>/infer``): one input tensor,
    ``datatype`` BYTES (base64 image files, shape [N]) or UINT8 (pixels already at the contract,
    shape [N, C, H, W]).
Options ``topk`` (1..classes), ``invert`` (auto|yes|no) and ``min_confidence`` (0..1: an image whose
top probability is below it is answered with ``"abstain": true``, its top-k still given) come from
``parameters`` in a JSON body, a multipart text field of that name, or an ``X-TopK`` / ``X-Invert`` /
``X-Min-Confidence`` header, in that order of precedence. (TorchServe 0.12 drops the query string of
``/predictions`` requests, so ``?topk=`` cannot work.)
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.core import INVERT_CHOICES, InputError, Limits, check_min_confidence, clip
from training.contract import Contract

OPTION_NAMES = ("topk", "invert", "min_confidence")
MAX_NAME = 64  # v2 tensor names and request ids: short strings, echoed back only when this short
PROTOCOL_PREDICTIONS, PROTOCOL_V2 = "predictions", "v2"


@dataclass(frozen=True)
class Request:
    """A parsed request: encoded images (bytes) or contract pixels ((C, H, W) uint8), and options."""

    items: tuple[bytes | np.ndarray, ...]
    topk: int | None = None
    invert: str = "auto"
    min_confidence: float | None = None  # None: the model's default (model-config.yaml)
    protocol: str = PROTOCOL_PREDICTIONS
    id: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What every response says about the model that answered."""

    name: str
    version: str
    variant: str
    device: str


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(400, "bad_parameter", "option values must be UTF-8 text") from None
    return str(value)


def _options(raw: Mapping[str, Any], typed: bool = False) -> dict[str, Any]:
    """The options ``raw`` gives, checked: ``{name: value}`` for those present. From text (headers,
    multipart fields) or, with ``typed``, from JSON ``parameters``, where topk must be a JSON integer,
    min_confidence a JSON number and invert a string."""
    out: dict[str, Any] = {}
    if raw.get("topk") is not None:
        value = raw["topk"]
        if typed and (type(value) is not int):
            raise InputError(400, "bad_parameter", f"topk must be an integer, got {type(value).__name__} {clip(value)}")
        text = value if typed else _text(value).strip()
        try:
            out["topk"] = int(text)
        except ValueError:
            raise InputError(400, "bad_parameter", f"topk must be an integer, got {clip(text)}") from None
    if raw.get("invert") is not None:
        value = raw["invert"]
        if typed and not isinstance(value, str):
            raise InputError(400, "bad_parameter", f"invert must be a string, got {type(value).__name__}")
        invert = _text(value).strip().lower()
        if invert not in INVERT_CHOICES:
            raise InputError(
                400, "bad_parameter", f"invert must be one of {', '.join(INVERT_CHOICES)}, got {clip(invert)}"
            )
        out["invert"] = invert
    if raw.get("min_confidence") is not None:
        out["min_confidence"] = _confidence(raw["min_confidence"], typed)
    return out


def _confidence(value: Any, typed: bool) -> float:
    try:
        if typed and type(value) not in (int, float):  # not bool, not a string
            raise TypeError
        return check_min_confidence(float(value if typed else _text(value).strip()))
    except (TypeError, ValueError, OverflowError):
        raise InputError(
            400,
            "bad_parameter",
            f"min_confidence must be a number from 0 to 1, got {type(value).__name__} {clip(value)}",
        ) from None


def _b64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise InputError(400, "bad_request", f"{where} must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(400, "bad_base64", f"{where} is not valid base64 ({clip(str(e))})") from None


def _check_count(n: int, limits: Limits) -> None:
    if n > limits.max_images:
        raise InputError(
            413,
            "too_many_images",
            f"{n} images in one request, over the limit of {limits.max_images}; split the request",
        )
    if n == 0:
        raise InputError(400, "empty_body", "the request lists no images")


def _parse_json(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InputError(400, "malformed_json", f"the body is not valid JSON ({e})") from None


def _looks_like_json(body: Any, content_type: str) -> bool:
    if isinstance(body, (dict, list)):  # TorchServe already decoded it (decode_input_request=true)
        return True
    if "json" in content_type.lower():
        return True
    head = bytes(body[:64]) if isinstance(body, (bytes, bytearray)) else str(body)[:64].encode()
    return head.lstrip()[:1] in (b"{", b"[")  # no image format starts with { or [


HEADER_OPTIONS = {"x-topk": "topk", "x-invert": "invert", "x-min-confidence": "min_confidence"}


def parse_request(
    params: Mapping[str, Any],
    contract: Contract,
    limits: Limits,
    content_types: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Request:
    """One TorchServe request (``{parameter name: value}``) -> ``Request``.

    TorchServe names the raw body ``body`` and each multipart part by its field name. ``headers``
    are the HTTP headers with lower-case names (for the ``X-TopK`` / ``X-Invert`` / ``X-Min-Confidence``
    options).

    Raises:
        InputError: empty body, malformed JSON or base64, an unknown JSON shape, too many images.
    """
    content_types = content_types or {}
    if (headers or {}).get("content-type", "").lower().startswith("application/x-www-form-urlencoded"):
        # curl --data-binary's default type: TorchServe has already split the bytes as a form.
        raise InputError(
            415,
            "form_encoded_body",
            "Content-Type application/x-www-form-urlencoded cannot carry an image; send the "
            "file with its own type (curl -T file, or -H 'Content-Type: image/png'), as "
            "multipart (-F file=@...) or as JSON",
        )
    params = dict(params)
    options = {name: (headers or {})[h] for h, name in HEADER_OPTIONS.items() if h in (headers or {})}
    options.update({k: params.pop(k) for k in OPTION_NAMES if k in params})
    opts = _options(options)
    if not params:
        raise InputError(
            400,
            "empty_body",
            'the request has no body: send image bytes, a multipart file, or JSON {"instances": [{"b64": ...}]}',
        )
    if len(params) == 1 and "body" in params:
        body = params["body"]
        if body is None or len(body) == 0:
            raise InputError(400, "empty_body", "the request body is empty: send image bytes")
        if _looks_like_json(body, content_types.get("body", "")):
            return _parse_json_request(
                body if isinstance(body, (dict, list)) else _parse_json(body), contract, limits, opts
            )
        return Request((bytes(body),), **opts)
    # multipart/form-data: every part that is not an option is one image file
    _check_count(len(params), limits)
    items = []
    for name, value in params.items():
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray)):
            raise InputError(400, "bad_request", f"multipart field {clip(name)} must be a file")
        if len(value) == 0:
            raise InputError(400, "empty_body", f"multipart field {clip(name)} is empty")
        items.append(bytes(value))
    return Request(tuple(items), **opts)


def _parse_json_request(doc: Any, contract: Contract, limits: Limits, opts: dict[str, Any]) -> Request:
    if not isinstance(doc, dict):
        raise InputError(
            400, "bad_request", 'the JSON body must be an object with "instances" (or "inputs" for KServe v2)'
        )
    if doc.get("parameters") is not None:
        if not isinstance(doc["parameters"], dict):
            raise InputError(400, "bad_request", '"parameters" must be an object')
        opts = {**opts, **_options({k: v for k, v in doc["parameters"].items() if k in OPTION_NAMES}, typed=True)}
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise InputError(400, "bad_request", '"instances" must be a list of {"b64": ...}')
        _check_count(len(instances), limits)
        items = []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict) or "b64" not in inst:
                raise InputError(400, "bad_request", f'instances[{i}] must be an object {{"b64": ...}}')
            items.append(_b64(inst["b64"], f"instances[{i}].b64"))
        return Request(tuple(items), **opts)
    if "inputs" in doc:
        return _parse_v2(doc, contract, limits, opts)
    raise InputError(400, "bad_request", 'the JSON body needs "instances": [{"b64": ...}] (or "inputs" for KServe v2)')


def _short_string(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise InputError(
            400,
            "bad_request",
            f"KServe v2: {what} must be a string of 1 to {MAX_NAME} "
            f"characters, got {type(value).__name__} {clip(value)}",
        )
    return value


def _flatten(data: list, size: int, what: str) -> list:
    """Row-major flattening of the v2 "data" (flat, or nested as deep as the shape), checking the
    element count at every level; C-speed list operations only, no Python loop per element."""
    flat = data
    for _ in range(4):  # a shape has at most 4 dimensions here
        if len(flat) > size:
            break
        kinds = set(map(type, flat))
        if list not in kinds:
            break
        if kinds != {list}:
            raise InputError(400, "bad_tensor", f"KServe v2: {what} mixes lists and values (ragged)")
        flat = list(itertools.chain.from_iterable(flat))
    if len(flat) != size:
        raise InputError(
            400,
            "bad_tensor",
            f"KServe v2: {what} holds {len(flat)} elements at some level, its shape says {size} in all",
        )
    return flat


def _parse_v2(doc: dict, contract: Contract, limits: Limits, opts: dict[str, Any]) -> Request:
    request_id = _short_string(doc["id"], '"id"') if "id" in doc else None
    inputs = doc["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError(400, "bad_request", 'KServe v2: "inputs" must hold exactly one tensor object')
    tensor = inputs[0]
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in tensor]
    if missing:
        raise InputError(400, "bad_request", f"KServe v2: the input tensor lacks {missing}")
    _short_string(tensor["name"], "the tensor's name")
    shape, dtype, data = tensor["shape"], tensor["datatype"], tensor["data"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(400, "bad_request", f"KServe v2: shape must be a list of 1 to 4 sizes, got {clip(shape)}")
    if not isinstance(data, (list, np.ndarray)):  # an array: raw tensor bytes (binary extension, gRPC)
        raise InputError(400, "bad_request", 'KServe v2: "data" must be a list')
    _check_count(shape[0], limits)
    if dtype == "BYTES":
        if shape not in ([shape[0]], [shape[0], 1]):
            raise InputError(
                400,
                "bad_request",
                f"KServe v2 BYTES: shape must be [N] (or [N, 1]) for N base64 images, got {clip(shape)}",
            )
        if not isinstance(data, list):
            raise InputError(400, "bad_tensor", "KServe v2 BYTES: data must be a list of images")
        flat = _flatten(data, shape[0], "BYTES data")
        # bytes: an image already in binary (the binary tensor extension, gRPC); text: base64 in JSON
        items = tuple(x if isinstance(x, bytes) else _b64(x, f"inputs[0].data[{i}]") for i, x in enumerate(flat))
        return Request(items, protocol=PROTOCOL_V2, id=request_id, **opts)
    if dtype == "UINT8":
        want = [shape[0], *contract.input_shape]
        if shape != want:
            raise InputError(
                400,
                "bad_tensor",
                f"KServe v2 UINT8: shape must be [N, C, H, W] = {want} for this model, got {clip(shape)}",
            )
        if isinstance(data, np.ndarray):  # raw bytes: already uint8, only the count to check
            if data.dtype != np.uint8 or data.size != int(np.prod(shape)):
                raise InputError(
                    400,
                    "bad_tensor",
                    f"KServe v2 UINT8: {data.size} {data.dtype} values, the shape says {int(np.prod(shape))} uint8",
                )
            return Request(tuple(data.reshape(shape)), protocol=PROTOCOL_V2, id=request_id, **opts)
        flat = _flatten(data, int(np.prod(shape)), "UINT8 data")
        # JSON integers only: numpy would silently cast 1.9, "7" or true (Python's bool is an int).
        kinds = set(map(type, flat))
        if kinds - {int}:
            raise InputError(
                400,
                "bad_tensor",
                f"KServe v2 UINT8: data must be integers 0..255, got {sorted(k.__name__ for k in kinds - {int})}",
            )
        try:
            values = np.asarray(flat, dtype=np.int64)
        except OverflowError:
            values = None
        if values is None or (values.size and (values.min() < 0 or values.max() > 255)):
            raise InputError(400, "bad_tensor", "KServe v2 UINT8: data must be integers 0..255")
        pixels = values.astype(np.uint8).reshape(shape)
        return Request(tuple(pixels), protocol=PROTOCOL_V2, id=request_id, **opts)
    raise InputError(
        400, "bad_request", f"KServe v2: datatype must be BYTES (encoded images) or UINT8 (pixels), got {clip(dtype)}"
    )


# --------------------------------------------------------------------------------------------------
# responses
# --------------------------------------------------------------------------------------------------
# The v2 output tensors, declared once: format_response fills them and the Open Inference Protocol
# runtime's model metadata lists them. Each: (name, datatype, shape with -1 for any size; the first
# dimension is the image, a second one the top-k rank). ``ood`` (the image does not look like the
# training data) and ``ood_score`` (the detector's score; the flag is score > the threshold export
# set, export/ood.py) are left out of the answers of a model exported before the detector existed.
V2_OUTPUTS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("label", "BYTES", (-1, -1)),
    ("index", "INT64", (-1, -1)),
    ("probability", "FP32", (-1, -1)),
    ("abstain", "BOOL", (-1,)),
    ("ood", "BOOL", (-1,)),
    ("ood_score", "FP32", (-1,)),
)


def format_response(
    request: Request,
    info: ModelInfo,
    topk_lists: list[list[dict]],
    abstain: list[bool] | None = None,
    ood: list[bool] | None = None,
    ood_score: Iterable[float] | None = None,
) -> dict:
    """Top-k per image (and per image whether the answer abstains, whether the image is out of
    distribution and its score) -> the response document for the request's protocol. ``ood`` and
    ``ood_score`` None (a model without a detector): the answer has neither."""
    abstain = [False] * len(topk_lists) if abstain is None else abstain
    per_image: dict[str, list] = {"abstain": list(abstain)}
    if ood is not None:
        assert ood_score is not None  # a detector gives both
        per_image.update(ood=list(ood), ood_score=[round(float(s), 6) for s in ood_score])
    if request.protocol == PROTOCOL_V2:
        n, k = len(topk_lists), len(topk_lists[0]) if topk_lists else 0
        per_rank = {
            "label": [c["label"] for row in topk_lists for c in row],
            "index": [c["index"] for row in topk_lists for c in row],
            "probability": [c["probability"] for row in topk_lists for c in row],
        }
        outputs = []
        for name, dtype, shape in V2_OUTPUTS:
            if len(shape) == 2:
                outputs.append({"name": name, "datatype": dtype, "shape": [n, k], "data": per_rank[name]})
            elif name in per_image:
                outputs.append({"name": name, "datatype": dtype, "shape": [n], "data": per_image[name]})
        out = {
            "model_name": info.name,
            "model_version": info.version,
            "parameters": {"variant": info.variant, "device": info.device},
            "outputs": outputs,
        }
        if request.id is not None:
            out["id"] = request.id
        return out
    return {
        "model": info.name,
        "version": info.version,
        "variant": info.variant,
        "device": info.device,
        "predictions": topk_lists,
        **per_image,
    }


def error_response(err: InputError) -> dict:
    return err.to_dict()
