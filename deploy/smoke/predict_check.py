"""Post golden images to a running server and check the labels: `make docker-smoke` and `make k8s-smoke`.

    python deploy/smoke/predict_check.py --url http://127.0.0.1:8080 --run digits [--count 32]

Golden images are held-out test images with their true labels (loadtest.images.load_pool: the
embedded digits test split for ``digits``). Each is posted as raw PNG bytes to
``/predictions/<RUN>``; the top-1 index must match the label for at least --min-accuracy of them,
no request may get a 5xx, and a body that is not an image must get a 4xx with a JSON body. Prints one
summary line; exit 0 when all of that holds, 1 otherwise, 2 when no labelled images exist for RUN.
"""

from __future__ import annotations

import argparse
import sys
import time

from loadtest.images import load_pool
from serving.httpclient import Session


def top1(doc: dict) -> int:
    """Top-1 class index of the first image in a /predictions response."""
    first = doc["predictions"][0]
    return int((first[0] if isinstance(first, list) else first)["index"])


def check(url: str, run: str, count: int, min_accuracy: float) -> tuple[bool, str]:
    pool = load_pool(run, limit=count)
    if any(label is None for label in pool.labels):
        return False, f"no labelled test images for {run!r} ({pool.source})"
    path = f"/predictions/{run}"
    endpoint = url.rstrip("/") + path
    correct, server_errors, latencies = 0, 0, []
    with Session(url) as session:  # one kept-alive connection, as curl and locust use
        for image, label in zip(pool.images, pool.labels):
            start = time.perf_counter()
            answer = session.request("POST", path, image, {"Content-Type": "image/png"})
            latencies.append((time.perf_counter() - start) * 1000)
            doc = answer.json()
            if answer.status != 200 or doc is None:
                server_errors += answer.status >= 500
                continue
            correct += top1(doc) == label
        bad = session.request("POST", path, b"this is not an image", {"Content-Type": "application/octet-stream"})
    bad_status, bad_doc = bad.status, bad.json()
    accuracy = correct / len(pool)
    latencies.sort()
    ok = accuracy >= min_accuracy and server_errors == 0 and 400 <= bad_status < 500 and bad_doc is not None
    summary = (f"{'PASS' if ok else 'FAIL'}: {endpoint}: {correct}/{len(pool)} golden images correct "
               f"(accuracy {accuracy:.3f}, need {min_accuracy}), {server_errors} 5xx, "
               f"non-image -> {bad_status} {'JSON' if bad_doc is not None else 'non-JSON'}, "
               f"median latency {latencies[len(latencies) // 2]:.1f} ms [{pool.source}]")
    return ok, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/smoke/predict_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference API base URL")
    parser.add_argument("--run", default="digits", help="served model name (a run name)")
    parser.add_argument("--count", type=int, default=32, help="golden images to post")
    parser.add_argument("--min-accuracy", type=float, default=0.8)
    args = parser.parse_args(argv)
    try:
        ok, summary = check(args.url, args.run, args.count, args.min_accuracy)
    except (OSError, ValueError, KeyError) as err:  # server down, not JSON, unexpected shape
        print(f"FAIL: {args.url}: {type(err).__name__}: {err}")
        return 1
    print(summary)
    if summary.startswith("no labelled"):
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
