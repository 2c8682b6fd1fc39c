"""TorchServe's bundled frontend logging against serving/log4j2.xml, side by side in one run.

    .venv/bin/python bench/bench_frontend_logging.py [--run digits] [--rounds 3] [--seconds 10]
                                                    [--docs docs/benchmarks.md]

Each round starts, for each of the two logging configs in turn, a private TorchServe (free ports, the
shipped serving/config.properties; only ``vmargs`` differs: without and with
``-Dlog4j.configurationFile=serving/log4j2.xml``) serving ``model_store/<run>.mar`` and then the
no-op handler at the same batch setting, warms it up, and loads it with wrk (closed loop, 16
connections). Reports per config the median req/s over the rounds and the bytes each log file got, so
the two configs see the same machine state within every round. Needs ``make archive`` (or ``make
demo``) for the run's archive, and wrk.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import tempfile
from pathlib import Path

from loadtest.docs import update_section
from loadtest.torchserve import NOOP_HANDLER, PrivateServer, baseline_archive
from loadtest.wrk import run_wrk, write_images, write_wrk_script
from serving.archive import ArchiveConfig
from serving.server import DEFAULT_CONFIG, read_properties
from training.machine import cpu_name

LOG4J = re.compile(r"\s*-Dlog4j2?\.configurationFile=\S+")


def configs() -> dict[str, dict[str, str]]:
    """vmargs overrides: TorchServe's bundled log4j2.xml (the flag removed) and ours (as shipped)."""
    vmargs = read_properties(DEFAULT_CONFIG)["vmargs"]
    return {"bundled log4j2.xml": {"vmargs": LOG4J.sub("", vmargs)}, "serving/log4j2.xml": {"vmargs": vmargs}}


def measure(store: Path, model: str, overrides: dict, images: list[Path], script: Path, seconds: float,
            work: Path) -> tuple[float, dict[str, int]]:
    ts = PrivateServer(store, [model], workdir=work)
    ts.overrides.update(overrides)
    with ts:
        url = f"{ts.url}/predictions/{model}"
        run_wrk(url, images, 16, 5, script)  # the JVM's JIT warms up
        r = run_wrk(url, images, 16, seconds, script)
        sizes = {p.name: p.stat().st_size for p in (ts.workdir / "logs").glob("*.log")}
    return r["requests"] / (r["duration_us"] / 1e6), sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="digits", help="serves model_store/RUN.mar")
    ap.add_argument("--model-store", default="model_store")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0, help="measured wrk seconds per server")
    ap.add_argument("--docs", default="", help="write the table into this file's frontend-logging section")
    a = ap.parse_args()
    mar = Path(a.model_store) / f"{a.run}.mar"
    if not mar.is_file():
        raise SystemExit(f"error: {mar} not found; build it first: make archive RUN={a.run}")
    work = Path(tempfile.mkdtemp(prefix="bench-logging-"))
    try:
        images, source = write_images(a.run, None, work / "images")
        script = write_wrk_script(work / "post.lua")
        store = work / "store"
        acfg = ArchiveConfig(run=a.run)  # the no-op handler at our archive's batch setting
        baseline_archive(NOOP_HANDLER, "noop", store, batch_size=acfg.batch_size,
                         max_batch_delay_ms=acfg.max_batch_delay_ms, workers=acfg.max_workers)
        shutil.copy(mar, store / mar.name)
        rates: dict[tuple[str, str], list[float]] = {}
        sizes: dict[tuple[str, str], dict[str, int]] = {}
        for rnd in range(a.rounds):
            for i, (name, overrides) in enumerate(configs().items()):
                for model in (a.run, "noop"):
                    rps, logs = measure(store, model, overrides, images, script, a.seconds,
                                        work / f"ts-{rnd}-{i}-{model}")
                    rates.setdefault((name, model), []).append(rps)
                    sizes[(name, model)] = logs
                    print(f"round {rnd + 1}: {name:20s} {model:8s} {rps:7.0f} req/s  ts_log.log "
                          f"{logs.get('ts_log.log', 0) / 1e6:.1f} MB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python bench/bench_frontend_logging.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "docs")
    lines = ["## TorchServe frontend logging: bundled vs `serving/log4j2.xml`", "",
             f"`{command}` ({cpu_name()}): {a.rounds} rounds, in each the two configs in turn, wrk closed "
             f"loop with 16 connections for {a.seconds:g} s after 5 s of warm-up, on {source}. "
             f"Median req/s over the rounds, and the log bytes of the last round.", "",
             "| config | model | req/s (median) | rounds | ts_log.log MB | model_log.log MB | access_log.log MB |",
             "|---|---|---|---|---|---|---|"]
    for (name, model), values in rates.items():
        s = sizes[(name, model)]
        lines.append(f"| {name} | {model} | **{statistics.median(values):.0f}** | "
                     f"{', '.join(f'{v:.0f}' for v in values)} | {s.get('ts_log.log', 0) / 1e6:.1f} | "
                     f"{s.get('model_log.log', 0) / 1e6:.1f} | {s.get('access_log.log', 0) / 1e6:.1f} |")
    lines.append("")
    for model in (a.run, "noop"):
        before, after = (statistics.median(rates[(n, model)]) for n in configs())
        lines.append(f"{model}: {before:.0f} -> {after:.0f} req/s ({(after / before - 1) * 100:+.0f} %).")
    section = "\n".join(lines)
    print("\n" + section)
    if a.docs:
        update_section(Path(a.docs), "frontend-logging", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
