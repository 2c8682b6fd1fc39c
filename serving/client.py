"""A small client for the running server: ``python -m serving.client demo|predict``.

  demo --run digits --count 8     post held-out digits (the test split, never trained on) as real PNG
                                  files, print predicted vs true labels
  predict --run NAME FILE...      post image files, print the JSON answers
  idle                            exit 0 when no server runs here (make demo checks this before its
                                  minute of work), 2 with one line naming what runs

Exit status 0 when every request was answered 200; 1 when the server is unreachable or answered an
error (one line naming it and the fix).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from serving.httpclient import NoAnswer, multipart, request
from serving.server import (
    DEFAULT_CONFIG,
    KEY_FILE,
    management_url_for,
    port_in_use,
    read_key,
    read_properties,
    running_pid,
)
from training.cli import ArgumentParser, HelpFormatter
from training.images import encode_png

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_WORKDIR = "logs/serve"  # make serve's (serving.__main__)
DEFAULT_KEY_FILE = f"{DEFAULT_WORKDIR}/{KEY_FILE}"


class ClientError(RuntimeError):
    """The server is unreachable or answered with an error."""


def heldout_digits(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images of the digits test split as uint8 (N, 1, 28, 28) pixels, and their labels."""
    from export.data import load_pixels
    from training.data import load_splits

    contract = load_splits("digits", val_fraction=0.0, download=False).contract
    px = load_pixels("digits", None, contract, "test", limit=count, seed=seed)
    return px.images, px.labels


def post(
    url: str, model: str, body: bytes, content_type: str, token: str | None = None, topk: int | None = None
) -> dict:
    """POST one request to ``/predictions/<model>``; returns the JSON answer or raises ClientError."""
    headers = {"Content-Type": content_type}
    if topk is not None:
        headers["X-TopK"] = str(topk)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    target = f"{url.rstrip('/')}/predictions/{model}"
    try:
        answer = request("POST", target, body, headers, timeout=60)
    except NoAnswer as e:
        raise ClientError(f"no server at {url} ({e}); start it with `make serve`") from None
    doc = answer.json()
    if not isinstance(doc, dict):  # a proxy's HTML page, a plain-text 500
        doc = {"message": answer.body[:200].decode(errors="replace")}
    if answer.status != 200:
        raise ClientError(
            f"{target} answered HTTP {answer.status}: {doc.get('message', doc)}{_hint(url, answer.status, doc, token)}"
        )
    return doc


def _hint(url: str, status: int, doc: dict, token: str | None) -> str:
    """What to do about an error answer, for the two a user meets first."""
    if status == 404:
        served = served_models(url)
        return (
            f"; this server serves: {', '.join(served)} (--run NAME)"
            if served
            else f"; list what is served: curl {management_url_for(url)}/models"
        )
    if status == 401 or doc.get("type") == "InvalidKeyException":  # TorchServe: 400 for a bad key
        return (
            "; the server wants a token (make serve TOKEN=1): --key-file names its key_file.json"
            if not token
            else "; the token in --key-file is not this server's (restarted?)"
        )
    return ""


def served_models(url: str) -> list[str]:
    """The models the server at ``url`` serves, from its management API (same host, the port of
    serving/config.properties); empty when that does not answer (another port, token auth)."""
    try:
        answer = request("GET", f"{management_url_for(url)}/models?limit=100", timeout=5)
        return [m["modelName"] for m in answer.json().get("models", [])] if answer.status == 200 else []
    except (NoAnswer, AttributeError, KeyError, TypeError):  # no answer, not the management API's JSON
        return []


def busy_reason(workdir: str | os.PathLike = DEFAULT_WORKDIR, config: str | os.PathLike = DEFAULT_CONFIG) -> str | None:
    """Why a new server could not start here (or would be replaced under a running one), or None:
    a server started from ``workdir`` still runs, or a port of ``config`` answers."""
    pid = running_pid(workdir)
    if pid is not None:
        return f"a server started from {workdir} is running (pid {pid})"
    props = read_properties(config)
    for key in ("inference_address", "management_address"):
        if key in props and port_in_use(props[key]):
            return f"something listens on {props[key]} ({key} in {config})"
    return None


def demo(url: str, run: str, count: int, token: str | None, seed: int = 0) -> int:
    """Post ``count`` held-out digits one request each, then all of them as one multipart request."""
    images, labels = heldout_digits(count, seed)
    pngs = [encode_png(x) for x in images]
    print(f"posting {len(pngs)} held-out digits (digits test split, seed {seed}) to {url}/predictions/{run}")
    correct = 0
    for i, (png, label) in enumerate(zip(pngs, labels, strict=True)):
        ans = post(url, run, png, "image/png", token, topk=1)
        best = ans["predictions"][0][0]
        correct += int(best["label"] == str(label))
        print(
            f"  image {i}: true {label}  predicted {best['label']}  p={best['probability']:.3f}  "
            f"{'ok' if best['label'] == str(label) else 'WRONG'}"
        )
    body, ctype = multipart({f"file{i}": (f"digit{i}.png", p, "image/png") for i, p in enumerate(pngs)})
    batch = post(url, run, body, ctype, token, topk=1)
    same = [row[0]["label"] for row in batch["predictions"]]
    print(
        f"{correct}/{len(pngs)} correct; model {batch['model']} version {batch['version']}, "
        f"{batch['variant']} on {batch['device']}; one multipart request with all {len(pngs)} images "
        f"answered {' '.join(same)}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m serving.client", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    p.add_argument(
        "command",
        choices=("demo", "predict", "idle"),
        help="demo: post held-out digits one by one, then as one batch; predict: post FILES; "
        "idle: succeed only when no server runs here",
    )
    p.add_argument("files", nargs="*", help="image files (predict)")
    p.add_argument("--run", default="digits", help="model name (the RUN it was trained as)")
    p.add_argument("--url", default=DEFAULT_URL, help="TorchServe inference address")
    p.add_argument("--count", type=int, default=8, help="held-out digits to post (demo)")
    p.add_argument("--seed", type=int, default=0, help="which held-out digits (demo)")
    p.add_argument("--key-file", default=DEFAULT_KEY_FILE, help="TorchServe key_file.json (token auth)")
    p.add_argument("--topk", type=int, default=3, help="labels per image in the answer")
    a = p.parse_intermixed_args(argv)  # files may come after options: predict --run cifarnet cat.png
    if a.command == "idle":
        reason = busy_reason()
        if reason:
            print(
                f"error: {reason}; it would keep answering with the model this replaces: stop it first (make stop)",
                file=sys.stderr,
            )
            return 2
        return 0
    token = read_key(a.key_file) if a.key_file else None
    try:
        if a.command == "demo":
            return demo(a.url, a.run, a.count, token, a.seed)
        if not a.files:
            p.error("predict needs at least one image file")
        for f in a.files:
            print(json.dumps(post(a.url, a.run, Path(f).read_bytes(), "application/octet-stream", token, topk=a.topk)))
        return 0
    except (ClientError, OSError) as e:  # OSError: a FILE that is missing, a folder, unreadable
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
