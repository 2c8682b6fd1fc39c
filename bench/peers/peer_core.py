"""What both peer servers (KServe ``ModelServer``, Seldon MLServer) call: the exported run loaded as
``serving/handler.py`` loads it, and v2 input tensors answered through ``serving.core`` with the
handler's own output layout (``serving.protocol.format_response``). Nothing here re-implements the
model, its preprocessing or its answer: a peer only adds its own protocol layer around these two calls.

The run comes from ``$PEER_ARTIFACT`` (``artifacts/digits`` by default), set by bench/bench_oip_peers.py.
"""

from __future__ import annotations

import base64
import binascii
import os

import numpy as np

from export.runtime import load_checked_variant
from serving.core import InferenceCore, InputError, Limits, abstains, top_k
from serving.protocol import PROTOCOL_V2, ModelInfo, Request, format_response

ARTIFACT_ENV = "PEER_ARTIFACT"


def load_core() -> tuple[InferenceCore, ModelInfo]:
    """The run's checked variant on the CPU, one intra-op thread per process (the handler's default)."""
    runner = load_checked_variant(os.environ.get(ARTIFACT_ENV, "artifacts/digits"), None, device="cpu", threads=1)
    info = ModelInfo(runner.manifest["name"], str(runner.manifest.get("version", "1")), runner.variant, runner.device)
    return InferenceCore(runner, Limits()), info


def to_items(datatype: str, shape: list[int], data) -> list[bytes | np.ndarray]:
    """One v2 input tensor -> the core's items: BYTES elements are encoded images (raw bytes from the
    binary extension or gRPC, base64 text in JSON, as our runtime reads them); UINT8 is (N, C, H, W) pixels."""
    if datatype == "BYTES":
        try:
            return [x if isinstance(x, bytes) else base64.b64decode(x, validate=True) for x in data]
        except (binascii.Error, ValueError, TypeError) as e:
            raise InputError(400, "bad_base64", f"a BYTES element is not base64 ({e})") from None
    if datatype == "UINT8":
        return list(np.asarray(data, dtype=np.uint8).reshape(shape))
    raise InputError(400, "bad_request", f"datatype must be BYTES (encoded images) or UINT8 (pixels), got {datatype}")


def answer(core: InferenceCore, info: ModelInfo, items: list) -> list[dict]:
    """Images (of one request, or of a batch a peer merged) -> the v2 output tensors, one image per row
    of the first dimension: ``[{"name", "datatype", "shape", "data"}, ...]`` exactly as our runtime answers."""
    k = core.check_topk(None)
    opened, _ = core.open_request(items)
    pixels = np.stack([core.finish(o) for o in opened])  # (N, C, H, W) uint8
    logits, scores = core.predict(pixels)
    best = top_k(logits, k, core.contract.class_names, core.temperature)
    abstain, ood = abstains(best, core.min_confidence), core.ood_flags(scores)
    if ood is not None:  # the handler's default (ood_abstain: true)
        abstain = [a or o for a, o in zip(abstain, ood)]
    doc = format_response(Request(tuple(items), protocol=PROTOCOL_V2), info, best, abstain, ood,
                          None if scores is None else list(scores))
    return doc["outputs"]
