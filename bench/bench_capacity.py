"""Capacity measured open loop, with the peers users would pick instead, in one run.

    python bench/bench_capacity.py [--run digits] [--duration 8] [--slo-p99-ms MS]

Capacity = the highest offered rate (Poisson arrivals, ``loadtest.openloop``) whose p99 latency from the
intended send time is within the SLO, with 0 errors and >= 98 % of the offered rate answered
(``loadtest.capacity``). Systems, on the same held-out images and the same exported model:

  * **ours**: the project's handler at the recommended setting (``serving.archive`` defaults), on
    TorchServe;
  * **oip**: the same archive on the Java-free runtime (``serving.oip``), its batch delay screened
    (``--oip-delays``: the runtime batches inline, so the delay TorchServe needs may only add latency);
  * **stock**: the stock-style TorchServe image handler (``loadtest/handlers/stock_handler.py``, eager,
    OMP_NUM_THREADS=1) at its best setting: each batch/delay/worker setting is screened closed loop
    and the best one is searched;
  * **triton**: NVIDIA Triton (``loadtest.triton_peer``: Python backend running the same decode and
    model, dynamic batching), each configuration screened and the best one searched; its answers are
    checked against ours image by image;
  * the bounds: **N**, each runtime's ceiling with a no-op handler at our setting (wrk, closed loop: a
    ceiling is a throughput), **C**, our handler's work in-process with the same workers and threads
    (``bench_serving_core.core_requests_per_s``), and the additive bound 1/(1/C + 1/N) per runtime.

Writes reports/capacity.json, reports/capacity.png, reports/capacity.md and the ``capacity`` section
of docs/benchmarks.md. The load generator shares the cores with the servers: its CPU use and how
late it sent are reported with every point.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from bench_serve import Setting, _start_profile, profile_summary  # noqa: E402
from bench_serving_core import core_requests_per_s  # noqa: E402
from export.runtime import read_manifest  # noqa: E402
from loadtest.capacity import SLO, Point, Search, SearchPlan, additive_bound, search_lockstep  # noqa: E402
from loadtest.docs import publish_report  # noqa: E402
from loadtest.images import load_pool  # noqa: E402
from loadtest.openloop import RunResult, Target, run_closed_loop, run_open_loop  # noqa: E402
from loadtest.torchserve import NOOP_HANDLER, STOCK_HANDLER, PrivateServer, baseline_archive  # noqa: E402
from loadtest.triton_peer import (TritonConfig, TritonServer, infer_request, top1_index,  # noqa: E402
                                  write_repository)
from loadtest.wrk import run_wrk, write_images, write_wrk_script  # noqa: E402
from serving.archive import ArchiveConfig, build_archive  # noqa: E402
from serving.server import tree_cpu_s  # noqa: E402
from serving.httpclient import request  # noqa: E402
from training.files import atomic_write_bytes  # noqa: E402


@dataclass(frozen=True)
class Config:
    run: str
    artifacts_dir: Path
    runs_dir: Path
    reports: Path
    docs: Path | None
    triton_venv: Path
    slo: SLO
    duration_s: float
    warmup_s: float
    screen_s: float
    warm_s: float
    max_points: int
    stock_settings: tuple[Setting, ...]
    triton_configs: tuple[TritonConfig, ...]
    profile_s: float
    oip_delays: tuple[int, ...] = (5,)


@dataclass
class SystemResult:
    system: str
    setting: str
    capacity_rps: float
    p99_ms: float
    p50_ms: float
    errors: int
    generator_cpu: float      # % of one core, at the capacity point
    achieved_rps: float = 0.0
    send_lag_p99_ms: float = 0.0
    server_cpu: float = 0.0   # % of one core: server and its workers, at the capacity point
    closed_loop_rps: float = 0.0  # the screen's closed-loop throughput (16 connections)
    screens: dict = field(default_factory=dict)  # setting -> closed-loop req/s
    points: list = field(default_factory=list)


def cpu_model() -> dict:
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Flags"):
                info[k.strip()] = v.strip()
    except OSError:
        pass
    flags = info.pop("Flags", "").split()
    info["isa"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return info


# ---- measuring ----------------------------------------------------------------------------------
def open_point(target: Target, rate: float, cfg: Config, server_pid: int, name: str) -> Point:
    cpu0, t0 = tree_cpu_s(server_pid), time.monotonic()
    r: RunResult = run_open_loop(target, rate, cfg.duration_s, cfg.warmup_s)
    server_cpu = 100 * (tree_cpu_s(server_pid) - cpu0) / (time.monotonic() - t0)
    extra = {"p90_ms": r.p90_ms, "p999_ms": r.p999_ms, "max_ms": r.max_ms, "error_kinds": r.error_kinds,
             "generator_cpu": r.generator_cpu, "send_lag_p99_ms": r.send_lag_p99_ms, "server_cpu": server_cpu,
             "connections": r.connections, "load_avg": os.getloadavg()[0]}
    p = Point(r.offered_rps, r.achieved_rps, r.p50_ms, r.p99_ms, r.errors, extra)
    verdict = "pass" if cfg.slo.passes(p) else "FAIL: " + "; ".join(cfg.slo.violations(p))
    print(f"    {name:6s} offered {r.offered_rps:6.0f}  achieved {r.achieved_rps:6.0f}  p50 {r.p50_ms:6.1f}  p99 "
          f"{r.p99_ms:7.1f} ms  errors {r.errors}  gen CPU {r.generator_cpu:3.0f}%  lag p99 "
          f"{r.send_lag_p99_ms:5.1f} ms  server CPU {server_cpu:3.0f}%  load {extra['load_avg']:.1f}  {verdict}",
          flush=True)
    return p


def warm(target: Target, cfg: Config) -> None:
    """A fresh server is slow for its first thousands of requests (TorchServe's Java frontend is still
    being JIT-compiled, ONNX Runtime plans each new batch size): closed-loop load before any measuring."""
    run_closed_loop(target, 16, cfg.warm_s, warmup_s=0.0)


def screen(target: Target, cfg: Config) -> float:
    """Closed-loop throughput with 16 connections, after a warm-up: ranks settings, seeds the search."""
    warm(target, cfg)
    return run_closed_loop(target, 16, cfg.screen_s, warmup_s=1.0).achieved_rps


def result(name: str, setting: str, s: Search, closed_rps: float, screens: dict, slo: SLO) -> SystemResult:
    pts = [{"offered_rps": p.offered_rps, "achieved_rps": p.achieved_rps, "p50_ms": p.p50_ms, "p99_ms": p.p99_ms,
            "errors": p.errors, "passes": slo.passes(p), **(p.extra or {})} for p in s.points]
    c = s.capacity
    if c is None:
        return SystemResult(name, setting, 0.0, 0.0, 0.0, 0, 0.0, closed_loop_rps=closed_rps, screens=screens,
                            points=pts)
    e = c.extra or {}
    return SystemResult(name, setting, c.offered_rps, c.p99_ms, c.p50_ms, c.errors, e.get("generator_cpu", 0.0),
                        c.achieved_rps, e.get("send_lag_p99_ms", 0.0), e.get("server_cpu", 0.0), closed_rps,
                        screens, pts)


def merge(targets: list[Target]) -> Target:
    return Target(targets[0].host, targets[0].port, tuple(r for t in targets for r in t.requests))


@contextmanager
def omp_threads(n: int):
    """OMP_NUM_THREADS for the servers started inside (TorchServe's stock CPU set-up uses 1)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)


# ---- the systems: each starter enters a server into ``stack`` and returns (target, pid, server) ----
@dataclass
class Running:
    target: Target
    pid: int
    server: object
    setting: str


def start_ours(cfg: Config, images: list[bytes], work: Path, stack: ExitStack) -> tuple[Running, ArchiveConfig]:
    acfg = ArchiveConfig(run=cfg.run, artifacts_dir=str(cfg.artifacts_dir), model_store=str(work / "ours"))
    if not acfg.mar_path.is_file():
        build_archive(acfg, log=lambda _m: None)
    ts = stack.enter_context(PrivateServer(work / "ours", [cfg.run], workdir=work / f"ours-ts-{time.monotonic_ns()}"))
    setting = f"b{acfg.batch_size}/d{acfg.max_batch_delay_ms}/w{acfg.max_workers}, {acfg.threads} thread"
    return Running(Target.post(f"{ts.url}/predictions/{cfg.run}", images), ts.server.pid, ts, setting), acfg


def start_oip(cfg: Config, images: list[bytes], work: Path, stack: ExitStack, delay_ms: int) -> Running:
    """Our archive (``serving.archive`` defaults but the batch delay) on the oip runtime."""
    acfg = ArchiveConfig(run=cfg.run, artifacts_dir=str(cfg.artifacts_dir), model_store=str(work / f"oip-d{delay_ms}"),
                         max_batch_delay_ms=delay_ms)
    if not acfg.mar_path.is_file():
        build_archive(acfg, log=lambda _m: None)
    srv = stack.enter_context(PrivateServer(Path(acfg.model_store), [cfg.run],
                                            workdir=work / f"oip-{time.monotonic_ns()}", runtime="oip"))
    setting = f"b{acfg.batch_size}/d{acfg.max_batch_delay_ms}/w{acfg.max_workers}, {acfg.threads} thread"
    return Running(Target.post(f"{srv.url}/predictions/{cfg.run}", images), srv.server.pid, srv, setting)


def start_stock(cfg: Config, s: Setting, images: list[bytes], work: Path, stack: ExitStack) -> Running:
    store = work / f"stock-{s.label().replace('/', '-')}"
    if not (store / "stock.mar").is_file():
        baseline_archive(STOCK_HANDLER, "stock", store, batch_size=s.batch, max_batch_delay_ms=s.delay_ms,
                         workers=s.workers, serialized_file=cfg.runs_dir / cfg.run / "best.pt")
    with omp_threads(1):
        ts = stack.enter_context(PrivateServer(store, ["stock"], workdir=store / f"ts-{time.monotonic_ns()}"))
    return Running(Target.post(f"{ts.url}/predictions/stock", images), ts.server.pid, ts, f"{s.label()}, 1 thread")


def start_triton(cfg: Config, tc: TritonConfig, images: list[bytes], work: Path, variant: str,
                 stack: ExitStack) -> Running:
    repo = work / f"triton-{tc.label().replace('/', '-')}"
    write_repository(repo, cfg.run, cfg.artifacts_dir / cfg.run, variant, tc, topk=5)
    tr = stack.enter_context(TritonServer(cfg.triton_venv, repo, cfg.run, tc))
    # Triton's header carries the JSON part's length, which differs per image: one request per image.
    target = merge([Target.post(tr.infer_url, [b], h) for b, h in map(infer_request, images)])
    return Running(target, tr.proc.pid, tr, f"{tc.label()}, {tc.threads} thread")


def top1_answers(running: Running, kind: str, images: list[bytes]) -> list[int | None]:
    """Top-1 class index per image, through the real server."""
    out = []
    for im in images:
        if kind == "triton":
            body, headers = infer_request(im)
            answer = request("POST", running.server.infer_url, body,
                             {"Content-Type": "application/octet-stream", **headers})
            out.append(top1_index(answer.body) if answer.status == 200 else None)
        else:
            answer = request("POST", f"{running.server.url}/predictions/{running.server.models[0]}", im,
                             {"Content-Type": "application/octet-stream"})
            out.append(json.loads(answer.body)["predictions"][0][0]["index"] if answer.status == 200 else None)
    return out


def profile_at(cfg: Config, ours: Running, rate: float, name: str = "ours") -> list:
    """py-spy on one of our workers while the open loop runs at ``rate``: self time by frame."""
    folded = cfg.reports / f"capacity_{name}_pyspy.txt"
    prof = _start_profile(ours.server.worker_pids(cfg.run), folded, argparse.Namespace(profile_s=cfg.profile_s))
    run_open_loop(ours.target, rate, cfg.profile_s + 1, 0.5)
    prof.wait(timeout=cfg.profile_s + 30)
    return profile_summary(folded) if folded.is_file() else []


def noop_ceiling(cfg: Config, acfg: ArchiveConfig, work: Path, runtime: str = "torchserve") -> float:
    """N: a runtime's own ceiling at our setting, wrk, closed loop (a ceiling is a throughput)."""
    store = work / "noop"
    if not (store / "noop.mar").is_file():
        baseline_archive(NOOP_HANDLER, "noop", store, batch_size=acfg.batch_size,
                         max_batch_delay_ms=acfg.max_batch_delay_ms, workers=acfg.max_workers)
    pngs, _ = write_images(cfg.run, None, work / "pngs", cfg.artifacts_dir, cfg.runs_dir)
    script = write_wrk_script(work / "post.lua")
    with PrivateServer(store, ["noop"], workdir=store / f"{runtime}-{time.monotonic_ns()}", runtime=runtime) as ts:
        url = f"{ts.url}/predictions/noop"
        run_wrk(url, pngs, 16, 2, script)
        w = run_wrk(url, pngs, 16, max(cfg.duration_s, 6), script)
    return w["requests"] / (w["duration_us"] / 1e6)


def measure_all(cfg: Config, images: list[bytes], variant: str, work: Path) -> dict:
    """Screens (each setting alone), then the three systems at their best settings side by side, searched
    in lockstep; then the bounds."""
    screens: dict[str, dict[str, float]] = {"ours": {}, "oip": {}, "stock": {}, "triton": {}}
    with ExitStack() as st:
        ours, acfg = start_ours(cfg, images, work, st)
        screens["ours"][ours.setting] = screen(ours.target, cfg)
        print(f"  ours {ours.setting}: closed loop {screens['ours'][ours.setting]:.0f} req/s", flush=True)
    for delay in cfg.oip_delays:
        with ExitStack() as st:
            oip = start_oip(cfg, images, work, st, delay)
            screens["oip"][oip.setting] = screen(oip.target, cfg)
            print(f"  oip {oip.setting}: closed loop {screens['oip'][oip.setting]:.0f} req/s", flush=True)
    for s in cfg.stock_settings:
        with ExitStack() as st:
            r = start_stock(cfg, s, images, work, st)
            screens["stock"][s.label()] = screen(r.target, cfg)
            print(f"  stock {r.setting}: closed loop {screens['stock'][s.label()]:.0f} req/s", flush=True)
    for tc in cfg.triton_configs:
        with ExitStack() as st:
            r = start_triton(cfg, tc, images, work, variant, st)
            screens["triton"][tc.label()] = screen(r.target, cfg)
            print(f"  triton {r.setting}: closed loop {screens['triton'][tc.label()]:.0f} req/s "
                  f"(ready in {r.server.ready_s:.1f} s)", flush=True)
    best_stock = max(cfg.stock_settings, key=lambda s: screens["stock"][s.label()])
    best_oip = max(screens["oip"], key=screens["oip"].get)
    best_delay = cfg.oip_delays[list(screens["oip"]).index(best_oip)]
    best_triton = max(cfg.triton_configs, key=lambda t: screens["triton"][t.label()])
    with ExitStack() as st:
        running = {"ours": start_ours(cfg, images, work, st)[0], "oip": start_oip(cfg, images, work, st, best_delay),
                   "triton": start_triton(cfg, best_triton, images, work, variant, st),
                   "stock": start_stock(cfg, best_stock, images, work, st)}
        answers = {k: top1_answers(running[k], k, images) for k in ("ours", "oip", "triton")}
        for r in running.values():
            warm(r.target, cfg)
        closed = {"ours": next(iter(screens["ours"].values())), "oip": screens["oip"][best_oip],
                  "stock": screens["stock"][best_stock.label()], "triton": screens["triton"][best_triton.label()]}
        print(f"  searching in lockstep: {', '.join(f'{k} {v.setting}' for k, v in running.items())}", flush=True)
        searches = search_lockstep(
            {k: ((lambda rate, k=k: open_point(running[k].target, rate, cfg, running[k].pid, k)), 0.7 * closed[k])
             for k in running}, SearchPlan(cfg.slo, max_points=cfg.max_points))
        results = [result(k, running[k].setting, searches[k], closed[k], screens[k], cfg.slo) for k in running]
        profiles = {r.system: profile_at(cfg, running[r.system], r.capacity_rps, r.system)
                    for r in results[:2] if cfg.profile_s > 0 and r.capacity_rps > 0}
    noop = noop_ceiling(cfg, acfg, work)
    noop_oip = noop_ceiling(cfg, acfg, work, "oip")
    print(f"  no-op ceiling N: TorchServe {noop:.0f} req/s, oip {noop_oip:.0f} req/s", flush=True)
    core = core_requests_per_s(cfg.artifacts_dir / cfg.run, variant, images, workers=acfg.max_workers,
                               threads=acfg.threads, batch=acfg.batch_size, seconds=max(cfg.duration_s, 6))
    print(f"  in-process core C: {core:.0f} req/s", flush=True)
    agree = [a == b for a, b in zip(answers["ours"], answers["triton"])]
    agree_oip = [a == b for a, b in zip(answers["ours"], answers["oip"])]
    return {"systems": results, "profiles": profiles, "acfg": acfg, "noop": noop, "noop_oip": noop_oip, "core": core,
            "answer_check": {"images": len(agree), "top1_agreement": sum(agree) / max(1, len(agree)),
                             "oip_top1_agreement": sum(agree_oip) / max(1, len(agree_oip)),
                             "ours_failed": answers["ours"].count(None), "oip_failed": answers["oip"].count(None),
                             "triton_failed": answers["triton"].count(None)}}


# ---- outputs -------------------------------------------------------------------------------------
def plot(systems: list[SystemResult], slo: SLO, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    for s in systems:
        pts = sorted((p for p in s.points if "offered_rps" in p), key=lambda p: p["offered_rps"])
        x = [p["offered_rps"] for p in pts]
        line, = a1.plot(x, [max(p["p99_ms"], 0.1) for p in pts], marker="o", label=f"{s.system} ({s.setting})")
        a2.plot(x, [p["achieved_rps"] for p in pts], marker="o", color=line.get_color(), label=s.system)
        if s.capacity_rps:
            a1.axvline(s.capacity_rps, color=line.get_color(), linestyle=":", linewidth=1)
    a1.axhline(slo.p99_ms, color="red", linestyle="--", linewidth=1, label=f"SLO p99 {slo.p99_ms:g} ms")
    a1.set(yscale="log", xlabel="offered rate (req/s, Poisson)", ylabel="p99 latency from intended send (ms, log)",
           title="p99 vs offered load (dotted: capacity)")
    hi = max((p["offered_rps"] for s in systems for p in s.points if "offered_rps" in p), default=1)
    a2.plot([0, hi], [0, hi], color="grey", linestyle="--", linewidth=1, label="achieved = offered")
    a2.set(xlabel="offered rate (req/s)", ylabel="achieved (answers/s)", title="throughput vs offered load")
    for ax in (a1, a2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_bytes(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def render(doc: dict) -> str:
    m, b, t, o = doc["machine"], doc["bounds"], doc["targets"], doc["targets_oip"]
    rows = ["| system | setting | capacity req/s | p50 ms | p99 ms | errors | achieved req/s | closed-loop req/s "
            "(16 conn.) | server CPU | generator CPU | send lag p99 ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in doc["systems"]:
        rows.append(f"| {s['system']} | {s['setting']} | **{s['capacity_rps']:.0f}** | {s['p50_ms']:.1f} | "
                    f"{s['p99_ms']:.1f} | {s['errors']} | {s['achieved_rps']:.0f} | {s['closed_loop_rps']:.0f} | "
                    f"{s['server_cpu']:.0f}% | {s['generator_cpu']:.0f}% | {s['send_lag_p99_ms']:.1f} |")
    screens = "; ".join(f"{s['system']}: " + ", ".join(f"{k} {v:.0f}" for k, v in s["screens"].items())
                        for s in doc["systems"] if len(s["screens"]) > 1)
    ok = lambda v: "met" if v else "**MISSED**"  # noqa: E731
    x = lambda r: "n/a (no capacity)" if r is None else f"{r:.2f}x"  # noqa: E731
    # More runnable work before the run than the cores can take: other jobs shared the machine.
    contended = (": **the machine was shared with other jobs**, so absolute numbers are depressed and noisy"
                 if doc["load_before"] > 1.5 else "")
    lines = [
        "## Capacity, open loop, with the peers (`make capacity`)",
        "",
        f"Command: `{doc['command']}` at commit {doc['commit']}, started {doc['started']}, took "
        f"{doc['elapsed_s'] / 60:.1f} min. Machine: {m.get('CPU(s)', '?')} cores, {m.get('Model name', '?')} "
        f"({', '.join(m['isa'])}); load average {doc['load_before']:.1f} before, {doc['load_after']:.1f} after "
        f"(the generator and the servers themselves count in it){contended}; settings were screened one at a time, then the four systems searched side by side in lockstep (one rate of each per round), compare the ratios. Model "
        f"`{doc['run']}` (variant `{doc['variant']}`), {doc['images']}.",
        "",
        f"Capacity = the highest offered rate (Poisson arrivals) with p99 from the intended send time <= "
        f"{doc['slo']['p99_ms']:g} ms, {doc['slo']['max_errors']} errors and >= {doc['slo']['min_achieved']:.0%} "
        f"answered; every server start is warmed with {doc['warm_s']:g} s of closed-loop load first; each point "
        f"{doc['duration_s']:g} s after {doc['warmup_s']:g} s warm-up, the generator "
        f"(`loadtest/openloop.py`) on the same cores (its CPU is `generator CPU`, % of one core; `send lag` "
        f"is how late it sent, counted in the latency).",
        "",
        *rows,
        "",
        f"Bounds at our setting: in-process core C = {b['core_rps']:.0f} req/s (our handler's `handle` without "
        f"a server, {b['core_setting']}); no-op ceiling N (wrk, closed loop, 16 connections): TorchServe "
        f"{b['noop_rps']:.0f} req/s, oip {b['noop_oip_rps']:.0f} req/s; additive bound 1/(1/C + 1/N): TorchServe "
        f"**{doc['additive_bound_rps']:.0f} req/s**, oip **{doc['additive_bound_oip_rps']:.0f} req/s**.",
        f"Settings screened closed loop before the search: {screens}." if screens else "",
        f"Answers vs ours on TorchServe, {doc['answer_check']['images']} held-out images, top-1 agreement: "
        f"Triton **{doc['answer_check']['top1_agreement']:.3f}**, oip "
        f"**{doc['answer_check']['oip_top1_agreement']:.3f}**.",
        "",
        "Targets (ratios of capacities in this run):",
        "",
        f"- ours / Triton >= 1.0: {x(t['vs_triton'])} {ok(t['vs_triton_ok'])}",
        f"- ours / additive bound >= 0.85: {x(t['vs_bound'])} {ok(t['vs_bound_ok'])}",
        f"- ours / stock at its best setting >= 3.0: {x(t['vs_stock'])} {ok(t['vs_stock_ok'])}",
        f"- ours p99 at capacity <= {doc['slo']['p99_ms']:g} ms: {t['p99_ms']:.1f} ms {ok(t['p99_ok'])}",
        f"- oip / Triton >= 1.0 (moonshot 1.5): {x(o['vs_triton'])} {ok(o['vs_triton_ok'])}",
        f"- oip / stock at its best setting >= 3.0: {x(o['vs_stock'])} {ok(o['vs_stock_ok'])}",
        f"- oip p99 at capacity <= {doc['slo']['p99_ms']:g} ms: {o['p99_ms']:.1f} ms {ok(o['p99_ok'])}",
        f"- oip / its additive bound: {x(o['vs_bound'])}; oip / ours on TorchServe: {x(doc['oip_vs_ours'])}",
        "",
        "![capacity curves](capacity.png)",
    ]
    for system, profile in doc.get("profiles", {}).items():
        lines += ["", f"py-spy, one {system} worker at its capacity rate ({doc['profile_s']:g} s, self time by frame):",
                  "", "| frame | share |", "|---|---|", *[f"| `{f}` | {s:.0%} |" for f, s in profile]]
    return "\n".join(x for x in lines if x is not None)


def targets(ours: float, triton: float, stock: float, bound: float, p99_ms: float, slo: SLO) -> dict:
    """Capacity ratios the server is held to: at least Triton's on the same model (a purpose-built
    server is the bar), 85 % of the additive bound 1/(1/C + 1/N) (the inference core's own rate and the
    runtime's no-op ceiling added up: the rest is the cost of putting them together) and 3x the stock
    handler's. A ratio is None when the peer had no capacity at all (then any capacity of
    ours beats it)."""
    ratio = lambda a, b: a / b if b > 0 else None  # noqa: E731
    t = {"vs_triton": ratio(ours, triton), "vs_bound": ratio(ours, bound), "vs_stock": ratio(ours, stock),
         "p99_ms": p99_ms}
    ok = lambda r, need: ours > 0 if r is None else r >= need  # noqa: E731
    t.update(vs_triton_ok=ok(t["vs_triton"], 1.0), vs_bound_ok=ok(t["vs_bound"], 0.85),
             vs_stock_ok=ok(t["vs_stock"], 3.0), p99_ok=ours > 0 and p99_ms <= slo.p99_ms)
    return t


def parse_args(argv=None) -> tuple[Config, str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="digits")
    p.add_argument("--artifacts-dir", default="artifacts")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--reports", default="reports")
    p.add_argument("--docs", default="docs/benchmarks.md", help="'' to skip the docs update")
    p.add_argument("--triton-venv", default=".venv-triton", help="virtualenv holding nvidia-pytriton")
    p.add_argument("--slo-p99-ms", type=float, default=SLO.p99_ms,
                   help="default: the serving SLO, %(default)g ms (serving/metrics.py)")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per rate")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--screen", type=float, default=4.0, help="closed-loop seconds per screened setting")
    p.add_argument("--warm", type=float, default=10.0, help="closed-loop seconds of warm-up per server start")
    p.add_argument("--max-points", type=int, default=7, help="rates measured per search")
    p.add_argument("--stock-settings", default="1:0:2,4:5:2,8:5:2", help="BATCH:DELAY_MS:WORKERS,...")
    p.add_argument("--triton-configs", default="2:8:8:1000:2,2:8:8:5000:2,2:16:8:2000:4",
                   help="INSTANCES:MAX_BATCH:PREFERRED:QUEUE_DELAY_US:HTTP_THREADS,...")
    p.add_argument("--profile", type=float, default=6.0, help="py-spy seconds on ours at capacity; 0: none")
    p.add_argument("--oip-delays", default="5,2,0", help="batch delays (ms) screened for the oip runtime")
    a = p.parse_args(argv)
    for need in (Path(a.artifacts_dir) / a.run / "manifest.json", Path(a.runs_dir) / a.run / "best.pt"):
        if not need.is_file():
            raise SystemExit(f"error: {need} missing; make train RUN={a.run} && make export RUN={a.run} first")
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk not found (it measures the no-op ceiling); apt-get install -y wrk")
    triton = tuple(TritonConfig(*(int(x) for x in c.split(":"))) for c in a.triton_configs.split(","))
    cfg = Config(a.run, Path(a.artifacts_dir), Path(a.runs_dir), Path(a.reports), Path(a.docs) if a.docs else None,
                 Path(a.triton_venv), SLO(p99_ms=a.slo_p99_ms), a.duration, a.warmup, a.screen, a.warm, a.max_points,
                 tuple(Setting.parse(s) for s in a.stock_settings.split(",")), triton, a.profile,
                 tuple(int(x) for x in a.oip_delays.split(",")))
    return cfg, "python bench/bench_capacity.py " + " ".join(sys.argv[1:] if argv is None else argv)


def main(argv=None) -> int:
    cfg, command = parse_args(argv)
    # A killed run still stops its servers (each is a context manager in an ExitStack).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started, t0, load_before = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), time.monotonic(), os.getloadavg()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    cfg.reports.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cfg.artifacts_dir / cfg.run)
    variant = manifest["default_variant"]["cpu"]
    pool = load_pool(cfg.run, limit=128, artifacts_dir=cfg.artifacts_dir, runs_dir=cfg.runs_dir)
    images = list(pool.images)
    print(f"{cfg.run}: {pool.source}; variant {variant}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        m = measure_all(cfg, images, variant, Path(tmp))
    acfg, systems = m["acfg"], m["systems"]
    ours, oip, triton, stock = (next(s for s in systems if s.system == k) for k in ("ours", "oip", "triton", "stock"))
    bound, bound_oip = additive_bound(m["core"], m["noop"]), additive_bound(m["core"], m["noop_oip"])
    doc = {
        "command": command, "commit": commit, "started": started, "elapsed_s": time.monotonic() - t0,
        "machine": cpu_model(), "load_before": load_before, "load_after": os.getloadavg()[0],
        "run": cfg.run, "variant": variant, "images": pool.source, "slo": asdict(cfg.slo),
        "duration_s": cfg.duration_s, "warmup_s": cfg.warmup_s, "warm_s": cfg.warm_s,
        "systems": [asdict(s) for s in systems],
        "bounds": {"core_rps": m["core"], "noop_rps": m["noop"], "noop_oip_rps": m["noop_oip"],
                   "core_setting": f"{acfg.max_workers} processes x {acfg.threads} thread, batch {acfg.batch_size}"},
        "additive_bound_rps": bound, "additive_bound_oip_rps": bound_oip,
        "answer_check": m["answer_check"],
        "profiles": m["profiles"], "profile_s": cfg.profile_s,
        "oip_vs_ours": oip.capacity_rps / ours.capacity_rps if ours.capacity_rps else None,
    }
    doc["targets"] = targets(ours.capacity_rps, triton.capacity_rps, stock.capacity_rps, bound, ours.p99_ms, cfg.slo)
    doc["targets_oip"] = targets(oip.capacity_rps, triton.capacity_rps, stock.capacity_rps, bound_oip, oip.p99_ms,
                                 cfg.slo)
    plot(systems, cfg.slo, cfg.reports / "capacity.png")
    section = render(doc)
    publish_report(cfg.reports, "capacity", doc, section, cfg.docs, "capacity")
    print("\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
