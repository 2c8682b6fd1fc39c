"""Locust suite for the served classifiers: ``locust -f loadtest/locustfile.py [--runs digits,cifarnet]``.

The runs to load are the ones the server serves, asked from its management API (``GET /models``),
unless ``--runs`` names them. Each user posts, to a run picked at random per request, held-out test
images of the dataset that run was trained on (``loadtest.images``) in the three forms the server accepts —
raw bytes, a multipart file upload, and a base64 JSON batch of several images — plus a share of
malformed requests (``--malformed-share``) that must be refused with a 4xx: a 4xx counts as success, anything
else as a failure. At quit time the SLO gates (``loadtest.gates``) decide the exit code.

With token authorization on (``make serve TOKEN=1``) every request carries the key TorchServe wrote to
``--key-file`` (default: the one in make serve's work directory). No server, or a server that
refuses the key, ends the run before it starts with one line naming the fix.

Add ``loadtest/shapes.py`` to ``-f`` for a step-load shape instead of a constant user count.
"""

from __future__ import annotations

import json
import random
import sys

from locust import FastHttpUser, between, events, task

from loadtest.bodies import b64_batch_body, malformed_request, multipart_body, predictions_in
from loadtest.gates import (
    DEFAULT_MAX_ERROR_RATE,
    DEFAULT_P95_MS,
    DEFAULT_P99_MS,
    Thresholds,
    Totals,
    format_summary,
    gate_report,
)
from loadtest.images import ImagePool, load_pool
from serving.client import DEFAULT_WORKDIR
from serving.server import DEFAULT_CONFIG, KEY_FILE, management_url_for, read_properties

POOLS: dict[str, ImagePool] = {}
# make serve's addresses: the server loaded unless --host (and --management-url) name another.
SERVE_CONFIG = read_properties(DEFAULT_CONFIG)
MALFORMED_SHARE, BATCH_IMAGES = 0.02, 4  # defaults of --malformed-share and --batch-images
SERVE_KEY_FILE = f"{DEFAULT_WORKDIR}/{KEY_FILE}"  # where make serve TOKEN=1 has TorchServe write its keys

# Share of the well-formed requests sent in each form (the malformed share is taken off the top).
FORM_WEIGHTS = {"raw": 0.6, "multipart": 0.2, "b64": 0.2}


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("visionpipe load test")
    group.add_argument(
        "--data-dir",
        default=None,
        env_var="LOADTEST_DATA_DIR",
        help="directory with the test split's files (cifar-10-batches-py for cifarnet)",
    )
    group.add_argument(
        "--artifacts-dir",
        default="artifacts",
        env_var="LOADTEST_ARTIFACTS_DIR",
        help="where <run>/manifest.json gives the contract of synthesised images",
    )
    group.add_argument(
        "--runs",
        default="",
        env_var="LOADTEST_RUNS",
        help="comma-separated runs to load (default: every model the server serves)",
    )
    group.add_argument(
        "--management-url",
        default=None,
        env_var="LOADTEST_MANAGEMENT_URL",
        help="TorchServe's management API, asked which models it serves (default: the "
        "--host's host on the management port of serving/config.properties)",
    )
    group.add_argument(
        "--key-file",
        default=SERVE_KEY_FILE,
        env_var="LOADTEST_KEY_FILE",
        help="TorchServe's key_file.json: its keys are sent when the server has token auth on",
    )
    group.add_argument(
        "--malformed-share",
        type=float,
        default=MALFORMED_SHARE,
        env_var="LOADTEST_MALFORMED_SHARE",
        help="fraction of requests that are malformed and must be answered 4xx",
    )
    group.add_argument(
        "--batch-images",
        type=int,
        default=BATCH_IMAGES,
        env_var="LOADTEST_BATCH_IMAGES",
        help="images per base64 JSON batch request",
    )
    group.add_argument(
        "--p95-ms",
        type=float,
        default=DEFAULT_P95_MS,
        env_var="LOADTEST_P95_MS",
        help="gate: p95 latency at most this (ms; default %(default)g)",
    )
    group.add_argument(
        "--p99-ms",
        type=float,
        default=DEFAULT_P99_MS,
        env_var="LOADTEST_P99_MS",
        help="gate: p99 latency at most this (ms; default %(default)g)",
    )
    group.add_argument(
        "--max-error-rate",
        type=float,
        default=DEFAULT_MAX_ERROR_RATE,
        env_var="LOADTEST_MAX_ERROR_RATE",
        help="gate: failed share at most this (default %(default)g)",
    )
    group.add_argument(
        "--gate-file", default=None, env_var="LOADTEST_GATE_FILE", help="write the gate verdict and totals as JSON here"
    )
    group.add_argument("--step-users", type=int, default=4, help="StepLoadShape: users added per step")
    group.add_argument("--step-seconds", type=float, default=10.0, help="StepLoadShape: seconds per step")


def _option(environment, name: str, default):
    opts = environment.parsed_options
    return getattr(opts, name, default) if opts is not None else default


def _auth(environment, kind: str) -> dict[str, str]:
    """The Authorization header for ``kind`` ("inference" or "management") from --key-file, or none
    (no file: the server runs without token auth, as make serve does unless TOKEN=1)."""
    from serving.server import read_key

    key = read_key(_option(environment, "key_file", "") or "/nonexistent", kind)
    return {"Authorization": f"Bearer {key}"} if key else {}


def served_runs(management_url: str, headers: dict | None = None) -> list[str]:
    """The models a TorchServe serves, from its management API (following its pagination)."""
    from serving.httpclient import NoAnswer, request

    runs, token = [], ""
    while True:
        try:
            answer = request(
                "GET",
                f"{management_url}/models?limit=100" + (f"&next_page_token={token}" if token else ""),
                headers=headers,
                timeout=10,
            )
        except NoAnswer as e:
            raise SystemExit(
                f"error: no server answers at {management_url} ({e}); "
                f"start one with make serve (or name another with HOST= and MANAGEMENT=)"
            ) from None
        status, body = answer.status, answer.body
        if status == 401 or b"InvalidKeyException" in body:  # TorchServe answers a bad key with 400
            raise SystemExit(
                f"error: {management_url} wants a token (make serve TOKEN=1) and the key file "
                f"has none it accepts; point --key-file (LOADTEST_KEY_FILE) at the "
                f"key_file.json that server wrote"
            )
        if status != 200:
            raise SystemExit(
                f"error: GET {management_url}/models answered HTTP {status}: {body[:200]!r}; "
                f"name the runs with --runs (LOADTEST_RUNS=)"
            )
        doc = json.loads(body)
        runs += [m["modelName"] for m in doc.get("models", [])]
        token = doc.get("nextPageToken")
        if not token:
            return runs


def _management_url(environment) -> str:
    given = _option(environment, "management_url", None)
    if given:
        return given.rstrip("/")
    return management_url_for(environment.host or ServedUser.host)


@events.init.add_listener
def _load_images(environment, **_kw) -> None:
    if environment.parsed_options is None:  # imported by a test, not run by locust
        return
    data_dir = _option(environment, "data_dir", None)
    runs = [r for r in str(_option(environment, "runs", "")).split(",") if r.strip()]
    if not runs:
        runs = served_runs(_management_url(environment), _auth(environment, "management"))
        print(f"[loadtest] the server serves: {', '.join(runs) or 'nothing'}", file=sys.stderr, flush=True)
    if not runs:
        raise SystemExit("error: the server serves no model; start one with make serve")
    for run in runs:
        POOLS[run] = load_pool(run, data_dir, artifacts_dir=_option(environment, "artifacts_dir", "artifacts"))
        print(f"[loadtest] {run}: {POOLS[run].source}", file=sys.stderr, flush=True)
    # gevent's loop caches "now" while this blocking start-up runs (imports, decoding test images:
    # seconds on a busy machine); locust then arms --run-time from that stale clock and the run ended
    # that many seconds early (a 5 s run sent nothing). Refresh it.
    import gevent

    gevent.get_hub().loop.update_now()


class ServedUser(FastHttpUser):
    """Posts images of a served run, picked at random per request, to ``/predictions/<run>``."""

    host = SERVE_CONFIG["inference_address"]  # without --host
    # Short think time: 16 such users keep a small CPU server busy without a closed-loop stampede.
    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.malformed_share = float(_option(self.environment, "malformed_share", MALFORMED_SHARE))
        self.batch_images = int(_option(self.environment, "batch_images", BATCH_IMAGES))
        self.auth = _auth(self.environment, "inference")

    def _image(self) -> bytes:
        return self.pool.images[self.rng.randrange(len(self.pool))]

    @task
    def predict(self) -> None:
        self.served_run = self.rng.choice(sorted(POOLS))
        self.pool = POOLS[self.served_run]
        if self.rng.random() < self.malformed_share:
            self._post_malformed()
            return
        form = self.rng.choices(list(FORM_WEIGHTS), weights=list(FORM_WEIGHTS.values()))[0]
        if form == "raw":
            self._post(f"{self.served_run} raw", self._image(), "application/octet-stream", expect=1)
        elif form == "multipart":
            body, ctype = multipart_body(self._image())
            self._post(f"{self.served_run} multipart", body, ctype, expect=1)
        else:
            images = [self._image() for _ in range(self.batch_images)]
            self._post(
                f"{self.served_run} b64x{self.batch_images}",
                b64_batch_body(images),
                "application/json",
                expect=self.batch_images,
            )

    def _post(self, name: str, body: bytes, ctype: str, expect: int) -> None:
        # locust annotates data as str | dict; its docstring and code take bytes too
        with self.client.post(
            f"/predictions/{self.served_run}",
            data=body,  # type: ignore[arg-type]
            headers={"Content-Type": ctype, **self.auth},
            name=name,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            got = predictions_in(resp.content or b"")
            if got is None:
                resp.failure("200 with a non-JSON body")
            elif got != expect:
                resp.failure(f"{expect} images posted, {got} predictions returned")
            else:
                resp.success()

    def _post_malformed(self) -> None:
        kind, body, ctype = malformed_request(self.rng, self._image())
        # locust annotates data as str | dict; its docstring and code take bytes too
        with self.client.post(
            f"/predictions/{self.served_run}",
            data=body,  # type: ignore[arg-type]
            headers={"Content-Type": ctype, **self.auth},
            name=f"{self.served_run} malformed",
            catch_response=True,
        ) as resp:
            if 400 <= resp.status_code < 500:
                resp.success()
            else:
                resp.failure(f"malformed ({kind}) answered HTTP {resp.status_code}, expected 4xx")


def dominant_failure(errors) -> tuple[str, int]:
    """The failure message seen most often over every request name (raw, multipart, b64 fail alike
    when the cause is the server's), whitespace collapsed and cut to one line; ("", 0) with none."""
    counts: dict[str, int] = {}
    for e in errors:
        message = " ".join(str(e.error).split())[:200]
        counts[message] = counts.get(message, 0) + e.occurrences
    return max(counts.items(), key=lambda kv: kv[1]) if counts else ("", 0)


@events.quitting.add_listener
def _apply_gates(environment, **_kw) -> None:
    """Decide the exit code from the SLO gates (locust's own rule would fail on any single error)."""
    total = environment.stats.total
    totals = Totals(
        requests=total.num_requests,
        failures=total.num_failures,
        p50_ms=total.get_response_time_percentile(0.50) or 0.0,
        p95_ms=total.get_response_time_percentile(0.95) or 0.0,
        p99_ms=total.get_response_time_percentile(0.99) or 0.0,
        rps=total.total_rps,
    )
    thresholds = Thresholds(
        p95_ms=float(_option(environment, "p95_ms", DEFAULT_P95_MS)),
        p99_ms=float(_option(environment, "p99_ms", DEFAULT_P99_MS)),
        max_error_rate=float(_option(environment, "max_error_rate", DEFAULT_MAX_ERROR_RATE)),
    )
    per_name = {
        e.name: {
            "requests": e.num_requests,
            "failures": e.num_failures,
            "p50_ms": e.get_response_time_percentile(0.50),
            "p99_ms": e.get_response_time_percentile(0.99),
        }
        for e in environment.stats.entries.values()
    }
    report = gate_report(
        totals,
        thresholds,
        requests_by_name=per_name,
        image_sources={run: pool.source for run, pool in POOLS.items()},
        failures_by_message={f"{e.name}: {e.error}": e.occurrences for e in environment.stats.errors.values()},
    )
    print("\n" + format_summary(report), file=sys.stderr, flush=True)
    reason, count = dominant_failure(environment.stats.errors.values())
    if count:  # the one reason to read first when the error gate broke
        print(
            f"  most failures: {count} of {total.num_failures} ({count / total.num_failures:.0%}): {reason}"
            + (
                f"  (the server wants a token: make serve TOKEN=1 writes {SERVE_KEY_FILE}, read by "
                "default; --key-file names another)"
                if "InvalidKeyException" in reason or "HTTP 401" in reason
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )
    gate_file = _option(environment, "gate_file", None)
    if gate_file:
        from training.files import atomic_write_json

        atomic_write_json(gate_file, report)
    environment.process_exit_code = 0 if report["passed"] else 1
