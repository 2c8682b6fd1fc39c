"""Command line: ``python -m serving archive|serve|stop``.

  archive --run RUN   artifacts/RUN/ -> model_store/RUN.mar
  serve               archive what is exported but not archived, start a server in the background
                      with every model_store/*.mar under its RUN name, return once each model answered
                      a real warm-up prediction, print curl commands. --runtime torchserve (default:
                      TorchServe's Java frontend) or oip (serving.oip: no Java, Open Inference
                      Protocol over HTTP and gRPC)
  stop                stop the server that `serve` started (either runtime)

Exit status 0 on success; 1 when TorchServe fails to start or a warm-up fails; 2 for a problem the user
can fix first (nothing exported, port taken, bad option). Errors are one line naming the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from serving.client import DEFAULT_WORKDIR
from serving.core import Limits
from serving.server import DEFAULT_CONFIG, REPO, RUNTIMES, ServerBusyError
from training.cli import HelpFormatter


def _archive_config(a, run: str):
    from serving.archive import ArchiveConfig

    return ArchiveConfig(
        run=run,
        artifacts_dir=a.artifacts_dir,
        model_store=a.model_store,
        variant_cpu=a.variant_cpu,
        variant_cuda=a.variant_cuda,
        batch_size=a.batch_size,
        max_batch_delay_ms=a.max_batch_delay,
        min_workers=a.workers,
        max_workers=a.workers,
        response_timeout_s=a.response_timeout,
        threads=a.threads,
        job_queue_size=a.job_queue_size,
        min_confidence=a.min_confidence,
        ood_abstain=not a.no_ood_abstain,
        limits=Limits(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Limits)}),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from serving.archive import ArchiveConfig

    d = Limits()
    ad = {f.name: f.default for f in dataclasses.fields(ArchiveConfig)}  # the defaults, stated once
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    paths = common.add_argument_group("paths")
    paths.add_argument("--artifacts-dir", default="artifacts", help="exported runs (make export)")
    paths.add_argument("--model-store", default="model_store", help="where RUN.mar goes and is served from")
    arch = common.add_argument_group("archive: variant, batching, workers (model-config.yaml)")
    arch.add_argument("--variant-cpu", default=None, help="default: the manifest's CPU default")
    arch.add_argument("--variant-cuda", default=None, help="default: the manifest's CUDA default")
    arch.add_argument("--batch-size", type=int, default=ad["batch_size"], help="TorchServe batchSize (requests)")
    arch.add_argument(
        "--max-batch-delay", type=int, default=ad["max_batch_delay_ms"], help="TorchServe maxBatchDelay (ms)"
    )
    arch.add_argument(
        "--workers", type=int, default=ad["max_workers"], help="workers per model (the sweep's best on 2 cores)"
    )
    arch.add_argument("--response-timeout", type=int, default=ad["response_timeout_s"], help="seconds")
    arch.add_argument("--threads", type=int, default=ad["threads"], help="intra-op threads per worker")
    arch.add_argument(
        "--min-confidence",
        type=float,
        default=ad["min_confidence"],
        help='answers whose calibrated top probability is below this say "abstain": true '
        "(0: never; a request's min_confidence overrides it)",
    )
    arch.add_argument(
        "--no-ood-abstain",
        action="store_true",
        help='an image the out-of-distribution detector flags keeps "abstain": false (its "ood": true still says so)',
    )
    arch.add_argument(
        "--job-queue-size",
        type=int,
        default=ad["job_queue_size"],
        help="requests queued per model before TorchServe answers 503 at once",
    )
    limits = common.add_argument_group("request limits (serving.core.Limits documents each)")
    for f in dataclasses.fields(Limits):
        limits.add_argument(
            f"--{f.name.replace('_', '-')}", type=int, default=getattr(d, f.name), help=f"handler limit {f.name}"
        )

    a = sub.add_parser("archive", parents=[common], help="build model_store/RUN.mar", formatter_class=HelpFormatter)
    a.add_argument("--run", required=True, help="the exported run (artifacts-dir/RUN/) = served model name")
    s = sub.add_parser(
        "serve", parents=[common], help="start a server in the background", formatter_class=HelpFormatter
    )
    s.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torchserve",
        help="torchserve (Java frontend) or oip (no Java; OIP over HTTP and gRPC)",
    )
    s.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help=f"config.properties (default: this checkout's {DEFAULT_CONFIG.relative_to(REPO)}; "
        "the oip runtime reads its addresses and limits too)",
    )
    s.add_argument("--workdir", default=DEFAULT_WORKDIR, help="logs, pid file, key file")
    s.add_argument("--token", action="store_true", help="turn token authorization on (as in the container)")
    s.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for every warm-up")
    s.add_argument(
        "--no-examples",
        action="store_true",
        help="do not print curl commands (for a caller that stops the server right after)",
    )
    t = sub.add_parser("stop", help="stop the server `serve` started", formatter_class=HelpFormatter)
    t.add_argument("--workdir", default=DEFAULT_WORKDIR, help="the one `serve` used")
    return p.parse_args(argv)


def cmd_archive(a) -> int:
    from serving.archive import build_archive

    build_archive(_archive_config(a, a.run))
    return 0


def cmd_serve(a) -> int:
    from export.runtime import MANIFEST_NAME
    from serving.archive import build_archive, needs_archive
    from serving.server import curl_examples, start_server, stop_server, wait_ready

    for manifest in sorted(Path(a.artifacts_dir).glob(f"*/{MANIFEST_NAME}")):
        run = manifest.parent.name
        if needs_archive(manifest.parent, Path(a.model_store) / f"{run}.mar"):
            build_archive(_archive_config(a, run))
    models = sorted(p.stem for p in Path(a.model_store).glob("*.mar"))
    if not models:
        print(
            f"error: no archives in {a.model_store}/ and no exports in {a.artifacts_dir}/; run "
            f"`make train export` (or `make export RUN=...`) first",
            file=sys.stderr,
        )
        return 2
    overrides = {"disable_token_authorization": "false"} if a.token else {}
    server = start_server(a.model_store, models, a.workdir, a.config, overrides, runtime=a.runtime)
    name = {"torchserve": "TorchServe", "oip": "The oip runtime"}[a.runtime]
    print(f"{name} starting (pid {server.pid}, log {server.log_file}); warming up {', '.join(models)} ...", flush=True)
    try:
        answers = wait_ready(server, models, timeout=a.timeout)
    except BaseException:
        stop_server(a.workdir)
        raise
    for m, ans in answers.items():
        print(f"  {m}: version {ans['version']}, {ans['variant']} on {ans['device']}: warm-up answered")
    if a.no_examples:
        print(f"{name} is up at {server.local(server.inference_url)}.")
        return 0
    print(
        f"\n{name} is up at {server.local(server.inference_url)} (stop it with `make stop`). "
        f"Try:\n{curl_examples(server, models)}"
    )
    return 0


def cmd_stop(a) -> int:
    from serving.server import stop_server

    print("Server stopped." if stop_server(a.workdir) else f"no server running from {a.workdir}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        return {"archive": cmd_archive, "serve": cmd_serve, "stop": cmd_stop}[a.command](a)
    except (FileNotFoundError, ValueError, ServerBusyError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # IntegrityError, ServerError, archiver failure
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    if len(lines) > 1:  # server errors carry a log tail: keep it, after the one line that matters
        print("\n".join(lines[1:]), file=sys.stderr)
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
