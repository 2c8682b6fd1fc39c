"""The session's real servers: their limits, and helpers to talk to them (fixtures in conftest.py).

One server per runtime (TorchServe, then the oip runtime: the ``served`` fixture is parametrised, so
every test that uses it runs against both). The tiny digits and cifarnet runs are exported through
``export``'s Python API, cifarnet is archived with its TorchScript variant, a copy of digits is archived as
``tinyq`` (one worker, batch 1, a job queue of 2: the back-pressure tests fill it), and
``python -m serving serve`` (what ``make serve`` runs) archives digits itself (exported, not yet
archived), starts the runtime on free ports from a config rendered into tmp_path, with token
authorization on, and returns after each model's warm-up. The server is always stopped (its whole
process group), also when a test fails.
"""

from __future__ import annotations

import base64
from pathlib import Path

from serving.client import heldout_digits
from serving.httpclient import request
from training.images import encode_png
from serving.core import Limits

# Larger than a digit, small enough to keep the suite fast; max_pixels above RATIO_FREE_PIXELS so
# that the bomb-ratio check is reachable, and the request/batch budgets at 1x/2x an image.
LIMITS = Limits(max_images=4, max_pixels=4_000_000, max_request_pixels=4_000_000,
                max_batch_pixels=8_000_000, max_image_bytes=200_000, max_response_bytes=200_000)
MAX_REQUEST_SIZE = 1_000_000  # TorchServe's own body limit in this test server
MAX_RESPONSE_SIZE = 300_000  # TorchServe's answer limit: an answer over it makes the frontend kill the worker
TINYQ_QUEUE = 2


def export_tiny(checkpoint: Path, out: Path, variants: tuple[str, ...]) -> dict:
    from export.core import ExportConfig, export_run

    cfg = ExportConfig(run=checkpoint.parent.name, runs_dir=str(checkpoint.parent.parent),
                       out_dir=str(out), checkpoint=str(checkpoint), variants=variants,
                       calib_size=64, check_size=64, eval_size=120, latency_rounds=0,
                       max_int8_drop=100.0)  # plumbing, not accuracy: a 1-epoch model may be noisy
    return export_run(cfg, log=lambda _msg: None)


def post(served, model: str, body: bytes, content_type: str = "application/octet-stream",
         headers: dict | None = None, path: str | None = None, timeout: float = 60
         ) -> tuple[int, dict | None, dict]:
    """(status, JSON body or None, lower-cased headers). The raw bytes are in headers["_raw"]."""
    answer = request("POST", served["url"] + (path or f"/predictions/{model}"), body,
                     {"Content-Type": content_type, "Authorization": f"Bearer {served['token']}", **(headers or {})},
                     timeout=timeout)
    return answer.status, answer.json(), {**answer.headers, "_raw": answer.body}


def auth_header(served) -> dict[str, str]:
    return {"Authorization": f"Bearer {served['token']}"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_serves(served) -> None:
    """The next valid request after any failure must succeed."""
    status, doc, _ = post(served, "digits", encode_png(heldout_digits(1)[0][0]), "image/png")
    assert status == 200 and doc["predictions"], doc


def workers(served, model: str) -> list[tuple]:
    """(id, pid, start time) of each of the model's workers: a restarted worker changes them."""
    from serving.server import worker_pids

    return worker_pids(served["server"], model, served["management_token"])


def worker_deaths(served) -> list[str]:
    """The server's log lines that report a worker dying or being restarted."""
    from serving.server import worker_deaths as deaths

    return deaths(served["server"])
