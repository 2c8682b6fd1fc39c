"""TorchServe sweep: variants x batch settings x workers, against a stock-style baseline and a no-op
ceiling, each configuration in its own TorchServe start; table, plot and recommendation.

    python bench/bench_serve.py [--runs digits cifarnet] [--duration 12] [--slo-p99-ms MS]

Load comes from ``wrk`` (C, one thread, keep-alive connections, raw PNG bodies drawn at random from
the held-out images of ``loadtest.images``): a Python generator would take a large share of the two
cores it is measuring. wrk's own CPU time and the server's are measured and reported with each row.

Two stages per run, to fit the machine's time: (1) every exported variant at one setting (batch 1,
2 workers); (2) the fastest variant across batch/delay/worker settings. Baselines: the stock-style
eager handler (``loadtest/handlers/stock_handler.py``, batch 1, 2 workers, OMP_NUM_THREADS=1 as
TorchServe's CPU defaults) and the no-op handler at every stage-2 setting (TorchServe's own ceiling).
The recommendation is the highest-throughput configuration with 0 errors and p99 within the SLO.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from export.runtime import read_manifest  # noqa: E402
from loadtest.capacity import SLO  # noqa: E402
from loadtest.docs import publish_report  # noqa: E402
from loadtest.wrk import run_wrk, write_images, write_wrk_script, wrk_binary  # noqa: E402
from loadtest.torchserve import NOOP_HANDLER, STOCK_HANDLER, PrivateServer, baseline_archive  # noqa: E402
from serving.archive import ArchiveConfig, build_archive  # noqa: E402
from serving.server import tree_cpu_s  # noqa: E402
from training.files import atomic_write_bytes  # noqa: E402
from training.machine import cpu_name  # noqa: E402

CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Setting:
    """TorchServe's per-model knobs: requests per batch, ms to wait for a batch, worker processes."""

    batch: int
    delay_ms: int
    workers: int

    @property
    def threads(self) -> int:  # intra-op threads per worker: the cores shared out, at least 1
        return max(1, CORES // self.workers)

    def label(self) -> str:
        return f"b{self.batch}/d{self.delay_ms}/w{self.workers}"

    @classmethod
    def parse(cls, text: str) -> "Setting":
        try:
            b, d, w = (int(x) for x in text.split(":"))
        except ValueError:
            raise SystemExit(f"error: setting {text!r} must be BATCH:DELAY_MS:WORKERS, e.g. 8:5:2") from None
        return cls(b, d, w)


@dataclass(frozen=True)
class BenchConfig:
    runs: tuple[str, ...]
    runs_dir: Path
    artifacts_dir: Path
    data_dir: str | None
    reports: Path
    docs: Path | None
    variants: tuple[str, ...] | None
    variant_setting: Setting
    settings: tuple[Setting, ...]
    stock_setting: Setting
    connections: int
    duration_s: float
    warmup_s: float
    slo_p99_ms: float
    profile_s: float


@dataclass
class Result:
    run: str
    kind: str            # "variant", "stock" or "noop"
    variant: str         # export variant, "eager (stock handler)" or "no-op"
    setting: str
    threads: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: int
    wrk_cpu_pct: float   # % of one core used by the load generator
    server_cpu_pct: float  # % of one core used by TorchServe (frontend + workers)
    ready_s: float
    extra: dict = field(default_factory=dict)


# ---- one configuration ---------------------------------------------------------------------------
def measure(cfg: BenchConfig, run: str, kind: str, variant: str, setting: Setting, mar_name: str,
            store: Path, images: list[Path], script: Path, profile_to: Path | None = None) -> Result:
    """Start TorchServe serving ``store/<mar_name>.mar``, warm up, measure, stop."""
    with PrivateServer(store, [mar_name], workdir=store / "ts") as ts:
        url = f"{ts.url}/predictions/{mar_name}"
        described = ts.describe(mar_name)
        got = (described["batchSize"], described["minWorkers"])
        if got != (setting.batch, setting.workers):
            raise RuntimeError(f"{mar_name}: TorchServe runs batch/workers {got}, asked {setting}")
        run_wrk(url, images, cfg.connections, cfg.warmup_s, script)
        cpu0 = tree_cpu_s(ts.server.pid)
        profiler = _start_profile(ts.worker_pids(mar_name), profile_to, cfg) if profile_to else None
        w = run_wrk(url, images, cfg.connections, cfg.duration_s, script)
        cpu1 = tree_cpu_s(ts.server.pid)
        if profiler is not None:
            profiler.wait(timeout=cfg.profile_s + 30)
        ready_s = ts.ready_s
    seconds = w["duration_us"] / 1e6
    errors = w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
    r = Result(run, kind, variant, setting.label(), setting.threads, w["requests"] / seconds,
               w["p50_us"] / 1e3, w["p90_us"] / 1e3, w["p99_us"] / 1e3, w["requests"], errors,
               100 * w["cpu_s"] / seconds, 100 * (cpu1 - cpu0) / seconds, ready_s)
    print(f"  {run:9s} {variant:22s} {r.setting:12s} {r.rps:8.1f} req/s  p50 {r.p50_ms:6.1f}  "
          f"p99 {r.p99_ms:7.1f} ms  errors {errors}  wrk {r.wrk_cpu_pct:4.0f}%  server {r.server_cpu_pct:4.0f}%"
          f"  (ready in {ready_s:.1f} s)", flush=True)
    return r


def _start_profile(pids: list[int], out: Path, cfg: BenchConfig):
    """py-spy on one worker while wrk runs: raw folded stacks, summarised by ``profile_summary``."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([py_spy, "record", "--pid", str(pids[0]), "--duration", str(int(cfg.profile_s)),
                             "--format", "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_summary(folded: Path, top: int = 12) -> list[tuple[str, float]]:
    """Share of samples per leaf frame (self time) from py-spy's raw folded output."""
    counts: dict[str, int] = {}
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        counts[leaf] = counts.get(leaf, 0) + int(n)
        total += int(n)
    return [(k, v / total) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:top]] if total else []


# ---- the sweep -----------------------------------------------------------------------------------
def sweep_run(cfg: BenchConfig, run: str, work: Path) -> tuple[list[Result], str]:
    artifact_dir = cfg.artifacts_dir / run
    manifest = read_manifest(artifact_dir)
    variants = [v for v in manifest["variants"] if cfg.variants is None or v in cfg.variants]
    images, source = write_images(run, cfg.data_dir, work / f"{run}-images", cfg.artifacts_dir, cfg.runs_dir)
    script = write_wrk_script(work / "post.lua")
    print(f"{run}: {source}", flush=True)
    results: list[Result] = []

    def variant_config(variant: str, s: Setting) -> Result:
        store = work / f"{run}-{variant}-{s.label().replace('/', '-')}"
        build_archive(ArchiveConfig(run=run, artifacts_dir=str(cfg.artifacts_dir), model_store=str(store),
                                    variant_cpu=variant, batch_size=s.batch, max_batch_delay_ms=s.delay_ms,
                                    min_workers=s.workers, max_workers=s.workers, threads=s.threads),
                      log=lambda _msg: None)
        return measure(cfg, run, "variant", variant, s, run, store, images, script)

    def noop_config(s: Setting) -> Result:
        store = work / f"{run}-noop-{s.label().replace('/', '-')}"
        baseline_archive(NOOP_HANDLER, "noop", store, batch_size=s.batch, max_batch_delay_ms=s.delay_ms,
                         workers=s.workers)
        return measure(cfg, run, "noop", "no-op", s, "noop", store, images, script)

    # Baseline: the stock-style eager handler, one intra-op thread per worker (OMP_NUM_THREADS=1).
    store = work / f"{run}-stock"
    s = cfg.stock_setting
    baseline_archive(STOCK_HANDLER, "stock", store, batch_size=s.batch, max_batch_delay_ms=s.delay_ms,
                     workers=s.workers, serialized_file=cfg.runs_dir / run / "best.pt")
    omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        stock = measure(cfg, run, "stock", "eager (stock handler)", s, "stock", store, images, script)
    finally:
        os.environ.pop("OMP_NUM_THREADS") if omp is None else os.environ.__setitem__("OMP_NUM_THREADS", omp)
    stock.threads = 1
    results.append(stock)
    # Stage 1: every variant at one setting.
    stage1 = [variant_config(v, cfg.variant_setting) for v in variants]
    results += stage1
    best_variant = max(stage1, key=lambda r: r.rps).variant
    # Stage 2: the fastest variant across settings, each with its no-op ceiling.
    for s in cfg.settings:
        if s != cfg.variant_setting:
            results.append(variant_config(best_variant, s))
        results.append(noop_config(s))
    if cfg.variant_setting not in cfg.settings:
        results.append(noop_config(cfg.variant_setting))
    return results, source


def recommend(results: list[Result], run: str, slo_p99_ms: float) -> Result | None:
    """Highest requests/s among this run's model configurations with 0 errors and p99 within the SLO."""
    ok = [r for r in results if r.run == run and r.kind == "variant" and r.errors == 0 and r.p99_ms <= slo_p99_ms]
    return max(ok, key=lambda r: r.rps) if ok else None


def targets(results: list[Result], best: Result | None, run: str, slo_p99_ms: float) -> dict:
    """The recommended configuration against its baselines: at least 2x the requests/s of TorchServe's
    stock handler on the eager model (what the exported variants and batching must buy), at least 75 %
    of a no-op handler's at the same setting (the handler's own decode, checks and answer cost at most a
    quarter), and p99 within the SLO."""
    stock = next(r for r in results if r.run == run and r.kind == "stock")
    fastest = best or max((r for r in results if r.run == run and r.kind == "variant"), key=lambda r: r.rps)
    noop = next((r for r in results if r.run == run and r.kind == "noop" and r.setting == fastest.setting), None)
    return {
        "config": f"{fastest.variant} {fastest.setting}", "meets_slo": best is not None,
        "vs_stock": fastest.rps / stock.rps, "vs_stock_ok": fastest.rps >= 2.0 * stock.rps,
        "vs_noop": fastest.rps / noop.rps if noop else None,
        "vs_noop_ok": bool(noop) and fastest.rps >= 0.75 * noop.rps,
        "p99_ms": fastest.p99_ms, "p99_ok": fastest.p99_ms <= slo_p99_ms, "errors": fastest.errors,
    }


# ---- outputs -------------------------------------------------------------------------------------
def table(results: list[Result], recs: dict[str, Result | None]) -> str:
    rows = ["| run | handler / variant | batch/delay/workers | threads | req/s | p50 ms | p90 ms | p99 ms "
            "| errors | wrk CPU | server CPU | ready s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        star = " **(recommended)**" if recs.get(r.run) is r else ""
        rows.append(f"| {r.run} | {r.variant}{star} | {r.setting} | {r.threads} | {r.rps:.0f} | {r.p50_ms:.1f} "
                    f"| {r.p90_ms:.1f} | {r.p99_ms:.1f} | {r.errors} | {r.wrk_cpu_pct:.0f}% | "
                    f"{r.server_cpu_pct:.0f}% | {r.ready_s:.1f} |")
    return "\n".join(rows)


def plot(results: list[Result], slo_p99_ms: float, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted({r.run for r in results})
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 5), squeeze=False)
    markers = {"stock": "s", "noop": "^", "variant": "o"}
    for ax, run in zip(axes[0], runs):
        for r in (x for x in results if x.run == run):
            label = r.variant if r.kind == "stock" else f"{r.variant} {r.setting}"
            ax.scatter(r.p99_ms, r.rps, marker=markers[r.kind], s=60, label=label)
        ax.axvline(slo_p99_ms, color="red", linestyle="--", linewidth=1, label=f"p99 SLO {slo_p99_ms:.0f} ms")
        ax.set_xscale("log")
        ax.set_xlabel("p99 latency (ms, log)")
        ax.set_ylabel("requests/s")
        ax.set_title(f"{run}: throughput vs p99 (16 connections)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    atomic_write_bytes(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def render_section(cfg: BenchConfig, results: list[Result], recs: dict, checks: dict, sources: dict,
                   profiles: dict, command: str, started: str, elapsed_s: float,
                   load: tuple[float, float]) -> str:
    lines = [
        "## Serving: TorchServe sweep and baselines (`make bench-serve`)",
        "",
        f"Command: `{command}` — started {started}, took {elapsed_s / 60:.1f} min. Machine: {cpu_name()}, "
        f"1-min load average {load[0]:.2f} before the sweep and {load[1]:.2f} after (above {CORES}: other "
        f"jobs shared the cores, and absolute numbers are low); no GPU was used. Every configuration is its own TorchServe start with the "
        f"shipped `serving/config.properties` (ports moved to free ones); load: `wrk -t1 -c{cfg.connections}` "
        f"for {cfg.duration_s:.0f} s after {cfg.warmup_s:.0f} s of warm-up, raw PNG bodies of held-out "
        f"images. The load generator runs on the same {CORES} cores: its CPU use is the `wrk CPU` column "
        f"(% of one core); `server CPU` is TorchServe's frontend + workers. `threads` = intra-op threads "
        f"per worker. Images: " + "; ".join(f"{k}: {v}" for k, v in sources.items()) + ".",
        "",
        table(results, recs),
        "",
        "![throughput vs p99](bench_serve.png)",
        "",
        f"Recommendation (highest req/s with 0 errors and p99 <= {cfg.slo_p99_ms:.0f} ms):",
        "",
    ]
    for run, best in recs.items():
        c = checks[run]
        if best is None:
            lines.append(f"- **{run}**: no configuration met p99 <= {cfg.slo_p99_ms:.0f} ms with 0 errors; "
                         f"fastest was {c['config']}.")
        else:
            lines.append(f"- **{run}**: `{best.variant}`, batchSize {best.setting.split('/')[0][1:]}, "
                         f"maxBatchDelay {best.setting.split('/')[1][1:]} ms, {best.setting.split('/')[2][1:]} "
                         f"worker(s) x {best.threads} thread(s): {best.rps:.0f} req/s, p99 {best.p99_ms:.1f} ms.")
        noop = f"{c['vs_noop']:.2f}x" if c["vs_noop"] is not None else "n/a"
        lines.append(f"  Targets ({c['config']}): >= 2.0x stock: {c['vs_stock']:.2f}x "
                     f"{'met' if c['vs_stock_ok'] else 'MISSED'}; >= 0.75x no-op at the same setting: {noop} "
                     f"{'met' if c['vs_noop_ok'] else 'MISSED'}; p99 <= {cfg.slo_p99_ms:.0f} ms: "
                     f"{c['p99_ms']:.1f} ms {'met' if c['p99_ok'] else 'MISSED'}; errors {c['errors']}.")
    for run, prof in profiles.items():
        lines += ["", f"py-spy profile of one `{run}` worker under the same load ({cfg.profile_s:.0f} s, self "
                      f"time by frame):", "", "| frame | share |", "|---|---|"]
        lines += [f"| `{frame}` | {share:.0%} |" for frame, share in prof]
    return "\n".join(lines)


def parse_args(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=["digits", "cifarnet"])
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--artifacts-dir", default="artifacts")
    p.add_argument("--data-dir", default=None, help="test split files (cifar-10-batches-py for cifarnet)")
    p.add_argument("--reports", default="reports")
    p.add_argument("--docs", default="docs/benchmarks.md", help="'' to skip the docs update")
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all exported)")
    p.add_argument("--variant-setting", default="1:0:2", help="BATCH:DELAY_MS:WORKERS of stage 1")
    p.add_argument("--settings", default="1:0:1,1:0:2,8:5:2,8:5:1", help="stage-2 settings")
    p.add_argument("--stock-setting", default="1:0:2",
                   help="the stock baseline's setting (TorchServe defaults: batch 1, one worker per core)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--duration", type=float, default=12.0, help="seconds measured per configuration")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--slo-p99-ms", type=float, default=SLO.p99_ms,
                   help="default: the serving SLO, %(default)g ms (serving/metrics.py)")
    p.add_argument("--profile", type=float, default=8.0, help="py-spy seconds on the recommended config; 0: none")
    a = p.parse_args(argv)
    try:
        wrk_binary()
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}")
    for run in a.runs:
        for need in (Path(a.artifacts_dir) / run / "manifest.json", Path(a.runs_dir) / run / "best.pt"):
            if not need.is_file():
                raise SystemExit(f"error: {need} missing; make train RUN={run} && make export RUN={run} first")
    return BenchConfig(tuple(a.runs), Path(a.runs_dir), Path(a.artifacts_dir), a.data_dir, Path(a.reports),
                       Path(a.docs) if a.docs else None,
                       tuple(a.variants.split(",")) if a.variants else None, Setting.parse(a.variant_setting),
                       tuple(Setting.parse(s) for s in a.settings.split(",")), Setting.parse(a.stock_setting),
                       a.connections, a.duration, a.warmup, a.slo_p99_ms, a.profile)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    command = "python bench/bench_serve.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started, t0 = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), time.monotonic()
    load_before = os.getloadavg()[0]
    results: list[Result] = []
    sources, recs, checks, profiles = {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        for run in cfg.runs:
            rs, sources[run] = sweep_run(cfg, run, work)
            results += rs
            recs[run] = recommend(results, run, cfg.slo_p99_ms)
            checks[run] = targets(results, recs[run], run, cfg.slo_p99_ms)
            c = checks[run]
            missed = not (c["vs_stock_ok"] and c["vs_noop_ok"] and c["p99_ok"] and c["errors"] == 0)
            if missed and cfg.profile_s > 0:
                best = recs[run] or max((r for r in rs if r.kind == "variant"), key=lambda r: r.rps)
                s = Setting.parse(best.setting.replace("b", "").replace("d", "").replace("w", "").replace("/", ":"))
                store = work / f"{run}-profile"
                build_archive(ArchiveConfig(run=run, artifacts_dir=str(cfg.artifacts_dir), model_store=str(store),
                                            variant_cpu=best.variant, batch_size=s.batch,
                                            max_batch_delay_ms=s.delay_ms, min_workers=s.workers,
                                            max_workers=s.workers, threads=s.threads), log=lambda _m: None)
                folded = cfg.reports / f"bench_serve_{run}_pyspy.txt"
                cfg.reports.mkdir(parents=True, exist_ok=True)
                measure(cfg, run, "variant", best.variant, s, run, store,
                        sorted((work / f"{run}-images").glob("*.png")), work / "post.lua", profile_to=folded)
                profiles[run] = profile_summary(folded) if folded.is_file() else []
    elapsed = time.monotonic() - t0
    cfg.reports.mkdir(parents=True, exist_ok=True)
    load = (load_before, os.getloadavg()[0])
    section = render_section(cfg, results, recs, checks, sources, profiles, command, started, elapsed, load)
    doc = {"command": command, "started": started, "elapsed_s": elapsed, "config": str(cfg),
           "machine": cpu_name(), "load_average": list(load),
           "results": [asdict(r) for r in results], "targets": checks, "profiles": profiles,
           "recommended": {k: (asdict(v) if v else None) for k, v in recs.items()}}
    plot(results, cfg.slo_p99_ms, cfg.reports / "bench_serve.png")
    publish_report(cfg.reports, "bench_serve", doc, section, cfg.docs, "bench-serve")
    print("\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
