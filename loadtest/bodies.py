"""Request bodies the load tests send, and the check on what comes back.

The server accepts raw image bytes, a multipart file upload and a base64 JSON batch
(``serving/protocol.py``); the malformed bodies here must each be refused with a 4xx JSON error.
"""

from __future__ import annotations

import base64
import json
import random

from serving.httpclient import multipart


def multipart_body(image: bytes, field: str = "data", filename: str = "image.png") -> tuple[bytes, str]:
    """A multipart/form-data body with one PNG file field; returns (body, content type)."""
    return multipart({field: (filename, image, "image/png")})


def b64_batch_body(images: list[bytes]) -> bytes:
    """``{"instances": [{"b64": ...}, ...]}``: several images in one request."""
    return json.dumps({"instances": [{"b64": base64.b64encode(im).decode()} for im in images]}).encode()


# Requests the server must refuse with a 4xx JSON error: (name, body, content type).
def malformed_request(rng: random.Random, image: bytes) -> tuple[str, bytes, str]:
    kind = rng.choice(("not-an-image", "truncated-png", "bad-base64", "empty-instances", "empty-body"))
    if kind == "not-an-image":
        return kind, bytes(rng.getrandbits(8) for _ in range(64)), "application/octet-stream"
    if kind == "truncated-png":
        return kind, image[: len(image) // 3], "image/png"
    if kind == "bad-base64":
        return kind, b'{"instances": [{"b64": "%%% not base64 %%%"}]}', "application/json"
    if kind == "empty-instances":
        return kind, b'{"instances": []}', "application/json"
    return kind, b"", "application/octet-stream"


def predictions_in(body: bytes) -> int | None:
    """How many images a 200 response answers: ``{"predictions": [per image, ...]}`` (serving's
    format), a bare JSON list (one entry per image), or another JSON object (one). None: not JSON."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(doc, dict) and isinstance(doc.get("predictions"), list):
        return len(doc["predictions"])
    return len(doc) if isinstance(doc, list) else 1
