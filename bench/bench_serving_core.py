"""Inference-core costs and intra-op threads per worker, measured side by side (no TorchServe).

    .venv/bin/python bench/bench_serving_core.py artifacts/digits artifacts/cifarnet [--seconds 5]

For each exported run and its CPU default variant (plus onnx-int8 when exported):
  * decode + convert-to-contract per image (``InferenceCore.to_pixels``) for a contract-sized PNG and a
    1024x768 JPEG photo; JPEG decoding with and without draft mode (DCT-domain downscaling);
  * the variant's forward at batch 1 and 8 with 1 and 2 intra-op threads (median of repeated calls);
  * two processes running batch-1 forwards at once (two workers on this machine, e.g. one per served
    model) with 1 vs 2 threads each: total calls/s, i.e. whether 2 threads per worker oversubscribe.
1 and 2 threads alternate round by round (ABAB) and each cell is the median over rounds, so that a
shared machine's background load hits both alike. Prints markdown tables; compare ratios within a run.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


from export.runtime import load_variant, read_manifest  # noqa: E402
from serving.core import InferenceCore, Limits, decode_image  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sample_images(contract) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    shape = (contract.height, contract.width) + ((3,) if contract.channels == 3 else ())
    out = {}
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, np.uint8)).save(buf, "PNG")
    out["contract-size PNG"] = buf.getvalue()
    # a smooth photo-like 1024x768 JPEG (random noise would be unrealistically large)
    y, x = np.mgrid[0:768, 0:1024]
    photo = np.stack([(x / 4) % 256, (y / 3) % 256, ((x + y) / 7) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=90)
    out["1024x768 JPEG"] = buf.getvalue()
    return out


def _worker(artifact_dir: str, variant: str, seconds: float, commands, results) -> None:
    """A stand-in TorchServe worker: one runner per thread count, batch-1 forwards on command."""
    runners = {t: load_variant(artifact_dir, variant, threads=t) for t in (1, 2)}
    x = np.zeros((1, *runners[1].contract.input_shape), np.uint8)
    for r in runners.values():
        r(x)
    results.put("ready")
    while (threads := commands.get()) is not None:
        if runners[threads].runtime == "torchscript":  # torch's intra-op pool is process-wide
            import torch
            torch.set_num_threads(threads)
        n, t_end = 0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            runners[threads](x)
            n += 1
        results.put(n / seconds)


def concurrent_calls_per_s(artifact_dir: Path, variant: str, seconds: float, rounds: int) -> dict[int, float]:
    """Two workers running at once; rounds alternate 1 and 2 threads (ABAB) so that the machine's
    background load hits both alike. Returns the median total calls/s per thread count."""
    ctx = mp.get_context("spawn")
    chans = [(ctx.Queue(), ctx.Queue()) for _ in range(2)]
    procs = [ctx.Process(target=_worker, args=(str(artifact_dir), variant, seconds, c, r)) for c, r in chans]
    for p in procs:
        p.start()
    for _, r in chans:
        assert r.get(timeout=180) == "ready"
    totals: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for threads in (1, 2):
            for c, _ in chans:
                c.put(threads)
            totals[threads].append(sum(r.get(timeout=120) for _, r in chans))
    for c, _ in chans:
        c.put(None)
    for p in procs:
        p.join()
    return {t: statistics.median(v) for t, v in totals.items()}


def _handler_worker(artifact_dir: str, variant: str | None, threads: int, batch: int, images: list[bytes],
                    seconds: float, start, results) -> None:
    """Our TorchServe handler's ``handle`` without TorchServe: parse -> decode -> model -> JSON, on
    batches of ``batch`` raw-PNG requests, for ``seconds``; puts requests/s."""
    from serving.core import Limits
    from serving.handler import ClassifierHandler

    h = ClassifierHandler()
    h.setup(load_variant(artifact_dir, variant, threads=threads), Limits(), "core", None)
    reqs = [{"body": im} for im in images]
    h.handle(reqs[:batch], None)  # warm
    results.put("ready")
    start.wait()
    n, i, t_end = 0, 0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        h.handle([reqs[(i + j) % len(reqs)] for j in range(batch)], None)
        i += batch
        n += batch
    results.put(n / seconds)


def core_requests_per_s(artifact_dir: Path, variant: str | None, images: list[bytes], workers: int = 2,
                        threads: int = 1, batch: int = 8, seconds: float = 6.0) -> float:
    """C: requests/s of the in-process core as TorchServe's workers would run it (``workers``
    processes x ``threads`` intra-op threads, ``batch`` requests per call), all started together."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_handler_worker, args=(str(artifact_dir), variant, threads, batch, images,
                                                         seconds, start, results)) for _ in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        assert results.get(timeout=180) == "ready"
    start.set()
    total = sum(results.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--seconds", type=float, default=2.0, help="per concurrent round")
    ap.add_argument("--rounds", type=int, default=4, help="ABAB rounds per measurement")
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    print(f"cpu cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f}")
    print("\n| run | stage | input | median ms |\n|---|---|---|---|")
    for art in a.artifacts:
        manifest = read_manifest(art)
        core = InferenceCore(load_variant(art, threads=1))
        for name, data in sample_images(core.contract).items():
            print(f"| {manifest['name']} | decode + to contract | {name} ({len(data):,} B) | "
                  f"{median_ms(lambda d=data: core.to_pixels(d), a.repeats // 4):.3f} |")
    print("\n| JPEG | bytes | decode with draft (DCT downscale) ms | full decode ms |\n|---|---|---|---|")
    y, x = np.mgrid[0:768, 0:1024]
    photo = np.stack([(x / 4) % 256, (y / 3) % 256, ((x + y) / 7) % 256], -1).astype(np.uint8)
    for reps in (1, 4):  # 1024x768 and a 12.6 MP tile of it
        buf = io.BytesIO()
        Image.fromarray(np.tile(photo, (reps, reps, 1))).save(buf, "JPEG", quality=90)
        d = buf.getvalue()
        draft = median_ms(lambda: decode_image(d, Limits(), draft=("RGB", 32)), a.repeats // 5)
        full = median_ms(lambda: decode_image(d, Limits(), draft=None), a.repeats // 5)
        print(f"| {1024 * reps}x{768 * reps} | {len(d):,} | {draft:.2f} | {full:.2f} |")
    print("\n| run | variant | threads | batch 1 ms | batch 8 ms | 2 workers at once, batch 1: calls/s |")
    print("|---|---|---|---|---|---|")
    for art in a.artifacts:
        manifest = read_manifest(art)
        variants = [manifest["default_variant"]["cpu"]]
        if "onnx-int8" in manifest["variants"] and "onnx-int8" not in variants:
            variants.append("onnx-int8")
        for v in variants:
            runners = {t: load_variant(art, v, threads=t) for t in (1, 2)}
            c = runners[1].contract
            b1 = np.zeros((1, *c.input_shape), np.uint8)
            b8 = np.random.default_rng(0).integers(0, 255, (8, *c.input_shape), np.uint8)
            lat: dict[tuple[int, int], list[float]] = {}
            for _ in range(a.rounds):  # ABAB: 1 and 2 threads alternate
                for t, r in runners.items():
                    if r.runtime == "torchscript":
                        import torch
                        torch.set_num_threads(t)
                    lat.setdefault((t, 1), []).append(median_ms(lambda: r(b1), a.repeats))
                    lat.setdefault((t, 8), []).append(median_ms(lambda: r(b8), a.repeats // 2))
            conc = concurrent_calls_per_s(art, v, a.seconds, a.rounds)
            for t in (1, 2):
                print(f"| {manifest['name']} | {v} | {t} | {statistics.median(lat[(t, 1)]):.3f} | "
                      f"{statistics.median(lat[(t, 8)]):.3f} | {conc[t]:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
