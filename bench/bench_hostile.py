"""The costliest requests the serving limits admit, and what each costs one core.

    .venv/bin/python bench/bench_hostile.py [--repeats 3] [--docs docs/benchmarks.md] [--json reports/hostile.json]

For every format the server decodes, builds the most expensive image that still passes every check of
``serving.core.Limits`` (the most pixels allowed, in the fewest bytes the bomb-ratio check admits,
in the slowest mode), plus the costliest multi-image and KServe v2 bodies, and times the handler's
whole path for that request in-process on one thread: parse -> open (headers, limits) -> decode ->
contract conversion -> invert. The model call is left out (a fixed cost per image, measured by
bench_export). Prints a markdown table and, with ``--docs``, writes it into docs/benchmarks.md
(section ``hostile``). The target: no admitted request costs more than ~1 s of one core.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from export.core import cpu_name  # noqa: E402
from loadtest.docs import update_section  # noqa: E402
from serving.core import RATIO_FREE_PIXELS, InferenceCore, InputError, Limits  # noqa: E402
from serving.protocol import parse_request  # noqa: E402
from training.checkpoint import atomic_write_bytes  # noqa: E402
from training.contract import Contract  # noqa: E402

DIGITS = Contract(28, 28, 1, (0.17,), (0.3,), tuple(str(i) for i in range(10)))
CIFAR = Contract(32, 32, 3, (0.5,) * 3, (0.25,) * 3, tuple(f"c{i}" for i in range(10)))


class _NoModel:
    variant, device, manifest = "none", "cpu", {}

    def __init__(self, contract: Contract) -> None:
        self.contract = contract


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
    side = int(n ** 0.5)
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
            out[f"{name} {square[0] if 'WebP' not in name else webp[0]}x"
                f"{square[1] if 'WebP' not in name else webp[1]}"] = data
    return out


def request_cases(limits: Limits, contract: Contract) -> dict[str, dict]:
    """TorchServe parameters of the costliest admitted requests."""
    out = {name: {"body": data} for name, data in image_cases(limits).items()}
    per = limits.max_request_pixels // limits.max_images
    side = int(per ** 0.5)
    small = admitted(lambda r: _encode(_noisy("RGB", (side, per // side), r), "PNG"), per, limits)
    out[f"{limits.max_images} x PNG RGB {side}x{per // side} (JSON base64)"] = {"body": json.dumps(
        {"instances": [{"b64": base64.b64encode(small).decode()}] * limits.max_images}).encode()}
    pixels = np.random.default_rng(0).integers(0, 256, (limits.max_images, *contract.input_shape))
    out[f"v2 UINT8 {limits.max_images} x {'x'.join(map(str, contract.input_shape))} (JSON ints)"] = {
        "body": json.dumps({"inputs": [{"name": "x", "shape": list(pixels.shape), "datatype": "UINT8",
                                        "data": pixels.tolist()}]}).encode()}
    # Bodies as large as TorchServe's max_request_size lets through (16 MiB), refused only after parsing.
    n = (16 * 2**20 - 100) // 2
    out["v2 UINT8, 16 MiB of JSON ints (refused)"] = {"body": (
        '{"inputs": [{"name": "x", "shape": [1, 1, 1, 1], "datatype": "UINT8", "data": ['
        + "0," * (n - 1) + "0]}]}").encode()}
    out["16 MiB base64 string (refused)"] = {"body": (
        '{"instances": [{"b64": "' + "A" * (16 * 2**20 - 100) + '"}]}').encode()}
    return out


def cost_ms(core: InferenceCore, params: dict, repeats: int) -> tuple[float, str]:
    """Median CPU ms of one request's whole in-process path (this thread's CPU time, not wall time:
    the machine is shared), and its outcome ("200" or the refusal)."""
    times, outcome = [], "200"
    for _ in range(repeats):
        t0 = time.thread_time()
        try:
            req = parse_request(params, core.contract, core.limits)
            opened, _ = core.open_request(req.items)
            for o in opened:
                core.finish(o, req.invert)
        except InputError as e:
            outcome = f"{e.code} {e.type}"
        times.append((time.thread_time() - t0) * 1e3)
    return statistics.median(times), outcome


def run(limits: Limits, repeats: int) -> list[dict]:
    rows = []
    for cname, contract in (("digits 28x28x1", DIGITS), ("cifar 32x32x3", CIFAR)):
        core = InferenceCore(_NoModel(contract), limits)
        for name, params in request_cases(limits, contract).items():
            ms, outcome = cost_ms(core, params, repeats)
            body = params["body"]
            rows.append({"contract": cname, "request": name, "bytes": len(body), "outcome": outcome,
                         "median_ms": round(ms, 1)})
            print(f"{cname:16} {name:48} {len(body):>10,} B  {outcome:24} {ms:8.1f} ms", flush=True)
    return rows


def markdown(rows: list[dict], limits: Limits, command: str) -> str:
    worst = max(rows, key=lambda r: r["median_ms"])
    lines = [
        "## Hostile requests: the costliest admitted request per format",
        "",
        f"`{command}` — {cpu_name()}, Python {platform.python_version()}, CPU time of one thread "
        f"(median of the repeats); the handler's in-process path (parse, open, limits, decode, contract conversion, "
        f"invert), no model call. Limits: {limits.max_images} images, {limits.max_pixels:,} pixels per "
        f"image, {limits.max_request_pixels:,} per request, {limits.max_batch_pixels:,} per model call, "
        f"{limits.max_pixels_per_byte} pixels per byte above {RATIO_FREE_PIXELS:,} pixels.",
        "",
        "| contract | request (the most pixels in the fewest bytes admitted) | body bytes | outcome | ms, one core |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['contract']} | {r['request']} | {r['bytes']:,} | {r['outcome']} | {r['median_ms']:.0f} |"
              for r in rows]
    lines += ["", f"Costliest: **{worst['request']}** ({worst['contract']}, {worst['outcome']}), "
              f"{worst['median_ms']:.0f} ms of one core. "
              f"A model call holds at most max_batch_pixels / max_request_pixels = "
              f"{limits.max_batch_pixels // limits.max_request_pixels} such requests."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--docs", type=Path, help="write the table into this markdown file")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    a = ap.parse_args()
    limits = Limits()
    rows = run(limits, a.repeats)
    command = "make bench-hostile"
    if a.json:
        atomic_write_bytes(a.json, lambda f: f.write(json.dumps(rows, indent=1).encode()))
    if a.docs:
        update_section(a.docs, "hostile", markdown(rows, limits, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
