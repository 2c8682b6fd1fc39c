"""Large photos and bad bodies through a real TorchServe: status and latency per request.

    .venv/bin/python bench/bench_serving_http.py model_store --model cifarnet [--repeats 9]

Starts TorchServe (serving/config.properties, private ports) on the archives in MODEL_STORE, waits for
the warm-up, posts smooth photo-like JPEGs of growing size and a few malformed bodies to MODEL, prints a
markdown table (HTTP status, median ms per request), and stops the server. Why: TorchServe's stock
image handler answers malformed bodies with 503 and stalls on a large JPEG; the table shows what this
project's handler does with the same requests.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


from serving.httpclient import request  # noqa: E402
from serving.server import free_port, start_server, stop_server, wait_ready  # noqa: E402


def photo_jpeg(tiles: int) -> bytes:
    y, x = np.mgrid[0:768, 0:1024]
    photo = np.stack([(x / 4) % 256, (y / 3) % 256, ((x + y) / 7) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.tile(photo, (tiles, tiles, 1))).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_store", type=Path)
    ap.add_argument("--model", default="cifarnet")
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    models = sorted(p.stem for p in a.model_store.glob("*.mar"))
    ports = {k: f"http://127.0.0.1:{free_port()}" for k in ("inference_address", "management_address",
                                                             "metrics_address")}
    ports.update({k: str(free_port()) for k in ("grpc_inference_port", "grpc_management_port")})
    work = Path(tempfile.mkdtemp(prefix="bench-serving-http-"))
    server = start_server(a.model_store, models, work, overrides=ports)
    try:
        wait_ready(server, models, timeout=240)
        url = f"{server.inference_url}/predictions/{a.model}"
        big = photo_jpeg(6)
        cases = {f"{1024 * t}x{768 * t} JPEG": photo_jpeg(t) for t in (1, 4, 6)}
        cases.update({"empty body": b"", "text bytes": b"garbage!", "truncated 28 MP JPEG": big[: len(big) // 2]})
        print(f"| {a.model}: body | bytes | HTTP | median ms ({a.repeats} requests) |\n|---|---|---|---|")
        for name, body in cases.items():
            times, statuses = [], set()
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                status = request("POST", url, body, {"Content-Type": "image/jpeg"}, timeout=60).status
                times.append((time.perf_counter() - t0) * 1e3)
                statuses.add(status)
            print(f"| {name} | {len(body):,} | {'/'.join(map(str, sorted(statuses)))} | "
                  f"{statistics.median(times):.1f} |")
    finally:
        stop_server(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
