"""The costliest requests a model's limits admit: for bench_hostile (what each costs one core) and
the attack scenario of ``make fault`` (what they do to a real server's other clients).

For every format the server decodes, the most expensive image that still passes every check of
``serving.core.Limits``: the most pixels allowed, in the fewest bytes the bomb-ratio check admits,
in the slowest mode; plus the costliest multi-image and KServe v2 bodies, and 16 MiB bodies that are
refused only after parsing.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from serving.core import RATIO_FREE_PIXELS, Limits
from training.contract import Contract


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noisy(mode: str, size: tuple[int, int], noise_rows: int, seed: int = 0) -> Image.Image:
    """A flat image whose first ``noise_rows`` rows are random: its encoded size grows with them."""
    w, h = size
    bands = {"1": 1, "L": 1, "P": 1, "RGB": 3, "RGBA": 4, "I;16": 1}[mode]
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        a = np.full((h, w), 30000, np.uint16)
        a[:noise_rows] = rng.integers(0, 65535, (noise_rows, w), dtype=np.uint16)
        return Image.fromarray(a)
    a = np.full((h, w, bands), 200, np.uint8)
    a[:noise_rows] = rng.integers(0, 256, (noise_rows, w, bands), dtype=np.uint8)
    if mode == "1":
        return Image.fromarray(a[..., 0]).convert("1", dither=Image.Dither.NONE)
    if mode == "P":
        return Image.fromarray(a[..., 0]).convert("P")
    return Image.fromarray(a[..., 0] if bands == 1 else a, "L" if bands == 1 else mode)


def admitted(make, pixels: int, limits: Limits) -> bytes:
    """The smallest encoding ``make(noise_rows)`` gives that the bomb-ratio check admits at ``pixels``
    (more noise rows -> more bytes: a bisection on the rows)."""
    need = pixels / limits.max_pixels_per_byte if pixels > RATIO_FREE_PIXELS else 0
    lo, hi = 0, 1
    while len(make(hi)) < need:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(make(mid)) < need else (lo, mid)
    return make(hi)


def image_cases(limits: Limits) -> dict[str, bytes]:
    """One costliest admitted image per format and mode, at ``min(max_pixels, max_request_pixels)``."""
    n = min(limits.max_pixels, limits.max_request_pixels)
    side = int(n**0.5)
    square = (side, n // side)
    webp = (16383, n // 16383)  # WebP's largest side
    cases = {
        "PNG 1-bit": lambda r: _encode(_noisy("1", square, r), "PNG"),
        "PNG gray": lambda r: _encode(_noisy("L", square, r), "PNG"),
        "PNG 16-bit": lambda r: _encode(_noisy("I;16", square, r), "PNG"),
        "PNG RGBA": lambda r: _encode(_noisy("RGBA", square, r), "PNG"),
        "GIF": lambda r: _encode(_noisy("P", square, r), "GIF"),
        "WebP lossless RGB": lambda r: _encode(_noisy("RGB", webp, r), "WEBP", lossless=True, method=0),
        "TIFF deflate RGB": lambda r: _encode(_noisy("RGB", square, r), "TIFF", compression="tiff_adobe_deflate"),
        "TIFF 1-bit raw": lambda r: _encode(_noisy("1", square, r), "TIFF"),
        "BMP 1-bit": lambda r: _encode(_noisy("1", square, r), "BMP"),
        "JPEG progressive RGB": lambda r: _encode(_noisy("RGB", square, r), "JPEG", quality=95, progressive=True),
    }
    out = {}
    for name, make in cases.items():
        data = admitted(make, n, limits)
        if len(data) <= limits.max_image_bytes:
            out[
                f"{name} {square[0] if 'WebP' not in name else webp[0]}x{square[1] if 'WebP' not in name else webp[1]}"
            ] = data
    return out


def request_cases(limits: Limits, contract: Contract) -> dict[str, dict]:
    """TorchServe parameters of the costliest admitted requests."""
    out = {name: {"body": data} for name, data in image_cases(limits).items()}
    per = limits.max_request_pixels // limits.max_images
    side = int(per**0.5)
    small = admitted(lambda r: _encode(_noisy("RGB", (side, per // side), r), "PNG"), per, limits)
    out[f"{limits.max_images} x PNG RGB {side}x{per // side} (JSON base64)"] = {
        "body": json.dumps({"instances": [{"b64": base64.b64encode(small).decode()}] * limits.max_images}).encode()
    }
    pixels = np.random.default_rng(0).integers(0, 256, (limits.max_images, *contract.input_shape))
    out[f"v2 UINT8 {limits.max_images} x {'x'.join(map(str, contract.input_shape))} (JSON ints)"] = {
        "body": json.dumps(
            {"inputs": [{"name": "x", "shape": list(pixels.shape), "datatype": "UINT8", "data": pixels.tolist()}]}
        ).encode()
    }
    # Bodies as large as TorchServe's max_request_size lets through (16 MiB), refused only after parsing.
    n = (16 * 2**20 - 100) // 2
    out["v2 UINT8, 16 MiB of JSON ints (refused)"] = {
        "body": (
            '{"inputs": [{"name": "x", "shape": [1, 1, 1, 1], "datatype": "UINT8", "data": [' + "0," * (n - 1) + "0]}]}"
        ).encode()
    }
    out["16 MiB base64 string (refused)"] = {
        "body": ('{"instances": [{"b64": "' + "A" * (16 * 2**20 - 100) + '"}]}').encode()
    }
    return out


def archive_settings(mar: Path) -> tuple[Limits, Contract]:
    """The handler limits and the contract packed in a .mar (its model-config.yaml and manifest)."""
    import yaml

    from export.runtime import MANIFEST_NAME
    from serving.handler import HandlerConfig

    with zipfile.ZipFile(mar) as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
        manifest = json.loads(z.read(MANIFEST_NAME))
    return HandlerConfig.from_yaml(config).limits, Contract.from_dict(manifest["contract"])


def content_type(body: bytes) -> str:
    return "application/json" if body[:1] == b"{" else "application/octet-stream"
