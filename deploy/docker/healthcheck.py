"""Container HEALTHCHECK: healthy only when the models can answer, not merely when Java is up.

TorchServe's ``GET /ping`` reports "Healthy" (200) once every registered model has its minimum number
of workers, but it is also "Healthy" with no model at all. So this also asks the management API
(bound to loopback, reachable because this runs inside the container) that at least one model is
registered and that each has a READY worker. Exit 0 = healthy, 1 = not (Docker's convention).
"""

import json
import os
import sys
import urllib.request

TIMEOUT_S = 4


def local_url(env_var: str, default: str) -> str:
    """The address TorchServe listens on (config.properties, or its TS_* override), as a loopback URL."""
    return os.environ.get(env_var, default).replace("0.0.0.0", "127.0.0.1").rstrip("/")


INFERENCE = local_url("TS_INFERENCE_ADDRESS", "http://127.0.0.1:8080")
MANAGEMENT = local_url("TS_MANAGEMENT_ADDRESS", "http://127.0.0.1:8081")


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return json.load(response)


def problems() -> list[str]:
    """Returns what is wrong; empty when every registered model has a READY worker."""
    try:
        ping = get_json(f"{INFERENCE}/ping")
    except OSError as err:  # HTTPError (500 "Unhealthy"/"Partial Healthy") is an OSError too
        return [f"/ping: {err}"]
    if ping.get("status") != "Healthy":
        return [f"/ping: {ping}"]
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
