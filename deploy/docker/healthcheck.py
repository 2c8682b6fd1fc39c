"""Container HEALTHCHECK: healthy only when the models can answer, not merely when Java is up.

TorchServe's ``GET /ping`` reports "Healthy" (200) once every registered model has its minimum number
of workers, but it is also "Healthy" with no model at all. So this also asks the management API
(bound to loopback, reachable because this runs inside the container) that at least one model is
registered and that each has a READY worker. Exit 0 = healthy, 1 = not (Docker's convention).
Runs with the image's /opt/venv python, where the project (and so its HTTP client) is installed.
"""

import json
import os
import sys

from serving.httpclient import NoAnswer, request

TIMEOUT_S = 4


def local_url(env_var: str, default: str) -> str:
    """The address TorchServe listens on (config.properties, or its TS_* override), as a loopback URL."""
    return os.environ.get(env_var, default).replace("0.0.0.0", "127.0.0.1").rstrip("/")


INFERENCE = local_url("TS_INFERENCE_ADDRESS", "http://127.0.0.1:8080")
MANAGEMENT = local_url("TS_MANAGEMENT_ADDRESS", "http://127.0.0.1:8081")


def get_json(url: str):
    """The JSON answer to a GET; ValueError for any status but 200, NoAnswer (an OSError) for none."""
    answer = request("GET", url, timeout=TIMEOUT_S)
    if answer.status != 200:
        raise ValueError(f"GET {url}: HTTP {answer.status} {answer.body[:200]!r}")
    return json.loads(answer.body)


def problems() -> list[str]:
    """Returns what is wrong; empty when every registered model has a READY worker."""
    try:
        ping = request("GET", f"{INFERENCE}/ping", timeout=TIMEOUT_S)
    except NoAnswer as err:
        return [f"/ping: {err}"]
    if ping.status != 200 or (ping.json() or {}).get("status") != "Healthy":  # 500: "Partial Healthy"
        return [f"/ping: HTTP {ping.status} {ping.body[:200]!r}"]
    models = [m["modelName"] for m in get_json(f"{MANAGEMENT}/models").get("models", [])]
    if not models:
        return ["no model registered"]
    found = []
    for name in models:
        described = get_json(f"{MANAGEMENT}/models/{name}")  # a list: one entry per version
        workers = [w for entry in described for w in entry.get("workers", [])]
        if not any(w.get("status") == "READY" for w in workers):
            found.append(f"{name}: no READY worker ({[w.get('status') for w in workers]})")
    return found


if __name__ == "__main__":
    try:
        issues = problems()
    except (OSError, ValueError, KeyError) as err:
        issues = [f"{type(err).__name__}: {err}"]
    if issues:
        print("unhealthy: " + "; ".join(issues))
        sys.exit(1)
    print("healthy")
