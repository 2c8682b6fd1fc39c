"""Command line: ``python -m serving.oip --model-store DIR [--models NAME ...]`` serves in the foreground.

Without --models every ``DIR/*.mar`` is served under its file name. Exit 0 after a SIGTERM/SIGINT
drain; 2 for a problem to fix first (port taken, archive missing or broken, bad option); 1 when a
worker fails to load its models.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from serving.oip.http import HttpLimits
from serving.oip.mar import ArchiveError
from serving.oip.supervisor import RuntimeConfig, StartError, Supervisor
from training.cli import HelpFormatter


def parse_args(argv: list[str] | None = None) -> RuntimeConfig:
    d = RuntimeConfig()
    p = argparse.ArgumentParser(
        prog="python -m serving.oip", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    p.add_argument("--model-store", default=d.model_store, help="folder of .mar archives")
    p.add_argument("--models", nargs="*", default=None, help="names to serve (default: every archive)")
    p.add_argument("--http", default=d.http, help="host:port of HTTP/1.1 (predictions, KServe v1, v2)")
    p.add_argument("--grpc", default=d.grpc, help="host:port of gRPC (inference.GRPCInferenceService)")
    p.add_argument("--metrics", default=d.metrics, help="host:port of Prometheus /metrics")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes, each serving every model (default: the archives' largest maxWorkers)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="where the models run")
    p.add_argument("--workdir", default=d.workdir, help="unpacked archives, workers.json, key_file.json")
    p.add_argument("--token", action="store_true", help="require Authorization: Bearer <key> (key_file.json)")
    p.add_argument("--drain", type=int, default=d.drain_s, help="seconds to answer in-flight requests on SIGTERM")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default=d.loop, help="the workers' event loop")
    limits = p.add_argument_group("connection limits (serving.oip.http.HttpLimits documents each)")
    for f in dataclasses.fields(HttpLimits):
        limits.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default, help=f"HttpLimits.{f.name}"
        )
    a = p.parse_args(argv)
    models = a.models or sorted(m.stem for m in Path(a.model_store).glob("*.mar"))
    if a.workers is not None and a.workers < 1:
        p.error(f"--workers must be at least 1, got {a.workers}")
    return RuntimeConfig(
        model_store=a.model_store,
        models=tuple(models),
        http=a.http,
        grpc=a.grpc,
        metrics=a.metrics,
        workers=a.workers,
        device=a.device,
        workdir=a.workdir,
        token=a.token,
        drain_s=a.drain,
        loop=a.loop,
        http_limits=HttpLimits(**{f.name: getattr(a, f.name) for f in dataclasses.fields(HttpLimits)}),
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [supervisor] %(levelname)s %(message)s")
    try:
        return Supervisor(cfg).run()
    except (StartError, ArchiveError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if "while loading" in str(e) else 2


if __name__ == "__main__":
    sys.exit(main())
