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
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from training.machine import cpu_name  # noqa: E402
from loadtest.attacks import request_cases  # noqa: E402
from loadtest.docs import update_section  # noqa: E402
from serving.core import RATIO_FREE_PIXELS, InferenceCore, InputError, Limits  # noqa: E402
from serving.protocol import parse_request  # noqa: E402
from training.files import atomic_write_json  # noqa: E402
from training.contract import Contract  # noqa: E402

DIGITS = Contract(28, 28, 1, (0.17,), (0.3,), tuple(str(i) for i in range(10)))
CIFAR = Contract(32, 32, 3, (0.5,) * 3, (0.25,) * 3, tuple(f"c{i}" for i in range(10)))


class _NoModel:
    variant, device, manifest = "none", "cpu", {}

    def __init__(self, contract: Contract) -> None:
        self.contract = contract


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
              f"A model call holds at most {limits.max_batch_pixels // limits.max_request_pixels} "
              f"request(s) at max_request_pixels (max_batch_pixels // max_request_pixels)."]
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
        atomic_write_json(a.json, rows)
    if a.docs:
        update_section(a.docs, "hostile", markdown(rows, limits, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
