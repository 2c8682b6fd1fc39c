"""Soak, fault and attack runs against a private TorchServe serving the shipped archive.

    python -m loadtest.resilience soak  [--run digits] [--duration 600] [--share 0.7]
    python -m loadtest.resilience fault [--run digits]
    python -m loadtest.resilience attack [--run digits] [--attackers 4]

Each first measures the server's maximum with ``wrk`` (16 connections), then drives an open-loop load
at a share of it: Poisson arrivals, latency from the intended send, every request kept
(``loadtest.openloop.BackgroundLoad``), cut into windows afterwards (``Records.window``):

* soak: a steady load for ``--duration`` s; every window records req/s, errors, p50/p99 and the
  workers' RSS. Passes with 0 errors, worker RSS growth < 10 % (after warm-up) and a stable p99.
* fault, three scripted faults under load: SIGKILL one worker (TorchServe restarts it: failed
  requests counted, time until the worker is READY and until throughput recovers); a body over
  ``max_request_size`` and an image over ``max_pixels`` (each must get a 4xx, the others none); stop
  and restart the server on the same ports (seconds until it answers again).
* attack: attackers post the costliest requests the archive's limits admit (``loadtest.attacks``),
  back to back, while normal users post held-out images at a share of the maximum. Passes with 0
  errors for the normal users, no worker restarted, and every attacker answered with a prediction, a
  4xx/413 or a 503 (small JSON); reports the normal users' p50/p99 before and during the attack.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil

from loadtest.docs import update_section
from loadtest.openloop import (
    BackgroundLoad,
    Records,
    Target,
    Window,
    add_client_options,
    latency_histogram,
    percentile_ms,
)
from loadtest.torchserve import PrivateServer
from loadtest.wrk import run_wrk, write_images, write_wrk_script, wrk_binary
from serving import httpclient
from serving.server import Server, worker_deaths
from training.cli import HelpFormatter
from training.files import atomic_write_json
from training.machine import cpu_name


# ---- analysis (pure functions of the records) ----------------------------------------------------
def recovery_s(
    records: Records, fault_t: float, baseline_rps: float, width: float = 2.0, share: float = 0.8, horizon: float = 60.0
) -> float | None:
    """Seconds after ``fault_t`` until a ``width``-second window again carries ``share`` of the
    baseline's successful req/s with no error; None if it never does within ``horizon``."""
    t = fault_t
    while t + width <= fault_t + horizon:
        w = records.window(t, t + width)
        if w.errors == 0 and w.rps >= share * baseline_rps and w.requests > 0:
            return t + width - fault_t
        t += width / 4
    return None


def statuses(records: Records, start: float = -math.inf, end: float = math.inf, failed: bool = False) -> dict[str, int]:
    """Requests meant to leave in ``[start, end)`` by HTTP status ("0": no answer), or only the failed ones."""
    mine = (records.intended >= start) & (records.intended < end) & (~records.ok if failed else True)
    codes, counts = np.unique(records.status[mine], return_counts=True)
    return {str(c): int(n) for c, n in zip(codes, counts, strict=True)}


def rss_growth(samples: list[tuple[float, float]], warmup_s: float) -> float | None:
    """Relative growth of RSS from the first sample after ``warmup_s`` to the last sample."""
    after = [rss for t, rss in samples if t >= warmup_s]
    if len(after) < 2 or after[0] <= 0:
        return None
    return after[-1] / after[0] - 1.0


def p99_stable(ws: list[Window], factor: float = 1.5) -> bool:
    """The median p99 of the last third of the windows is within ``factor`` of the first third's."""
    if len(ws) < 3:
        return True
    third = len(ws) // 3
    first = statistics.median(w.p99_ms for w in ws[:third])
    last = statistics.median(w.p99_ms for w in ws[-third:])
    return last <= factor * max(first, 1.0)


def machine_line(r: dict) -> str:
    """Where a report's numbers were measured: the CPU and the 1-minute load average around the run."""
    return f"{r['machine']}; 1-min load average {r['load_before']:.2f} before the run, {r['load_after']:.2f} after"


# ---- helpers on a running server -----------------------------------------------------------------
def worker_rss_mb(ts: PrivateServer, model: str) -> float:
    total = 0
    for pid in ts.worker_pids(model):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return total / 2**20


def max_rps(ts: PrivateServer, model: str, images: list[Path], work: Path, seconds: float = 8.0) -> dict:
    """The server's ceiling, closed loop with wrk (C, 16 connections): the least client CPU taken from
    the cores the server shares, so the share of it that the open loop then offers is of the server."""
    script = write_wrk_script(work / "post.lua")
    url = f"{ts.url}/predictions/{model}"
    run_wrk(url, images, 16, 2, script)  # warm-up
    w = run_wrk(url, images, 16, seconds, script)
    return {
        "rps": w["requests"] / (w["duration_us"] / 1e6),
        "p99_ms": w["p99_us"] / 1e3,
        "errors": w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"],
    }


def users(url: str, bodies: list[bytes], rate: float, args: argparse.Namespace) -> BackgroundLoad:
    """The normal users: held-out images, open loop at ``rate`` req/s, started."""
    return BackgroundLoad(
        Target.post(url, bodies), rate_rps=rate, max_connections=args.max_connections, timeout_s=args.timeout
    ).start()


def post_file_with_curl(url: str, path: Path) -> tuple[int, bytes]:
    """POST a large file with curl: a server may answer 413 and close before the upload ends, and
    curl (like browsers and most clients) still reads that answer where urllib sees a reset."""
    import subprocess

    proc = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            f"@{path}",
            url,
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )  # the status is the answer
    body, _, code = proc.stdout.rpartition(b"\n")
    return (int(code) if code.strip().isdigit() else 0), body


def huge_pixels_png(side: int = 10_000) -> bytes:
    """A tiny file (a black PNG compresses to ~100 kB) whose header claims side x side pixels."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side), 0).save(buf, "PNG", optimize=False)
    return buf.getvalue()


def _server(ts: PrivateServer) -> Server:
    if ts.server is None:
        raise RuntimeError("the private server has not started")
    return ts.server


# ---- soak ----------------------------------------------------------------------------------------
def soak(args: argparse.Namespace) -> dict:
    model = args.run
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, PrivateServer(Path(args.model_store), [model]) as ts:
        work = Path(tmp)
        images, source = write_images(model, args.data_dir, work / "images", Path(args.artifacts_dir))
        peak = max_rps(ts, model, images, work)
        rate = args.share * peak["rps"]
        print(
            f"soak {model}: max {peak['rps']:.0f} req/s (wrk, 16 connections); offering {rate:.0f} req/s "
            f"(Poisson) for {args.duration:.0f} s",
            flush=True,
        )
        load = users(f"{ts.url}/predictions/{model}", [p.read_bytes() for p in images], rate, args)
        rss: list[tuple[float, float]] = []
        while load.now() < args.duration:
            rss.append((load.now(), worker_rss_mb(ts, model)))
            time.sleep(min(args.window, max(0.0, args.duration - load.now())))
        records = load.stop()
        rss.append((load.now(), worker_rss_mb(ts, model)))
    assert load.result is not None  # set by stop()
    ws = records.windows(0.0, args.duration, args.window)
    total = records.window(0.0, load.result.duration_s)
    growth = rss_growth(rss, warmup_s=min(60.0, args.duration / 5))
    result = {
        "run": model,
        "images": source,
        "duration_s": args.duration,
        "max_rps": peak["rps"],
        "target_rps": rate,
        "achieved_rps": total.rps,
        "requests": total.requests,
        "errors": total.errors,
        "p50_ms": total.p50_ms,
        "p99_ms": total.p99_ms,
        "worker_rss_mb": rss,
        "rss_growth": growth,
        "p99_stable": p99_stable(ws),
        "windows": [asdict(w) for w in ws],
        "generator_cpu": load.result.generator_cpu,
        "send_lag_p99_ms": load.result.send_lag_p99_ms,
        "error_kinds": load.result.error_kinds,
    }
    result["passed"] = total.errors == 0 and growth is not None and growth < 0.10 and result["p99_stable"]
    return result


def soak_section(r: dict, command: str) -> str:
    ws = r["windows"]
    rows = ["| window (s) | req/s | errors | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    step = max(1, len(ws) // 12)
    rows += [
        f"| {w['start']:.0f}-{w['end']:.0f} | {w['rps']:.0f} | {w['errors']} | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} |"
        for w in ws[::step]
    ]
    rss = r["worker_rss_mb"]
    growth = f"{r['rss_growth']:+.1%}" if r["rss_growth"] is not None else "n/a"
    return "\n".join(
        [
            "## Soak (`make soak`)",
            "",
            (
                f"Command: `{command}`, on {machine_line(r)}. {r['run']}: max {r['max_rps']:.0f} req/s "
                f"(wrk, 16 connections); open-loop load (Poisson arrivals, `loadtest/openloop.py`, latency from "
                f"the intended send) at {r['target_rps']:.0f} req/s for {r['duration_s']:.0f} s (achieved "
                f"{r['achieved_rps']:.0f} req/s; the generator used {r['generator_cpu']:.0f} % of one core and sent "
                f"{r['send_lag_p99_ms']:.1f} ms late at p99): {r['requests']} requests, **{r['errors']} errors**, "
                f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms; worker RSS {rss[0][1]:.0f} MB at start, "
                f"{rss[-1][1]:.0f} MB at the end, growth after warm-up {growth}; p99 stable: {r['p99_stable']}. "
                f"Verdict: {'PASS' if r['passed'] else 'FAIL'}. Images: {r['images']}."
            ),
            "",
            *rows,
        ]
    )


# ---- faults --------------------------------------------------------------------------------------
def fault(args: argparse.Namespace) -> dict:
    """Under an open-loop load at ``--share`` of the measured maximum: kill a worker, send over-limit
    requests, restart the server; what clients saw at each step."""
    model = args.run
    out: dict = {"run": model}
    with tempfile.TemporaryDirectory(prefix="fault-") as tmp:
        work = Path(tmp)
        images, out["images"] = write_images(model, args.data_dir, work / "images", Path(args.artifacts_dir))
        bodies = [p.read_bytes() for p in images]
        ts = PrivateServer(Path(args.model_store), [model], workdir=work / "ts").start()
        load: BackgroundLoad | None = None
        try:
            out["initial_ready_s"] = ts.ready_s
            peak = max_rps(ts, model, images, work)
            rate = args.share * peak["rps"]
            out.update(max_rps=peak["rps"], target_rps=rate)
            url = f"{ts.url}/predictions/{model}"
            print(f"fault {model}: max {peak['rps']:.0f} req/s; load {rate:.0f} req/s", flush=True)
            load = users(url, bodies, rate, args)
            time.sleep(args.baseline)  # the baseline the kill is compared with
            running = load
            for step, run_step in (
                ("kill_worker", lambda: _kill_worker(ts, model, running, args)),
                ("over_limit", lambda: _over_limit(ts, url, running, work)),
                ("restart", lambda: _restart(ts, running)),
            ):
                out[step] = run_step()
                print(f"  {step}: {out[step]}", flush=True)
        finally:
            if load is not None and load.result is None:
                load.stop()
            ts.stop()
    out["passed"] = _fault_passed(out, args.max_failed)
    return out


def _kill_worker(ts: PrivateServer, model: str, load: BackgroundLoad, args: argparse.Namespace) -> dict:
    """SIGKILL one worker; how long until TorchServe replaced it and throughput came back."""
    pids = ts.worker_pids(model)
    kill_t = load.now()
    os.kill(pids[0], signal.SIGKILL)
    ready_t = None
    while load.now() < kill_t + 90:
        current = ts.worker_pids(model)
        if len(current) == len(pids) and pids[0] not in current:
            ready_t = load.now()
            break
        time.sleep(0.2)
    time.sleep(max(0.0, kill_t + args.after - load.now()))
    recs = load.wait_answered(kill_t + args.after)
    base = recs.window(kill_t - args.baseline + 2, kill_t)
    after = recs.window(kill_t, kill_t + args.after)
    now = load.now()
    return {
        "workers": len(pids),
        "killed_pid": pids[0],
        "baseline_rps": base.rps,
        "baseline_errors": base.errors,
        "failed_requests": after.errors,
        "requests_after": after.requests,
        "failed_by_status": statuses(recs, kill_t, kill_t + args.after, failed=True),
        "worker_ready_s": None if ready_t is None else ready_t - kill_t,
        "throughput_recovered_s": recovery_s(recs, kill_t, base.rps),
        "rps_last_5s": recs.window(now - 5, now).rps,
    }


def _over_limit(ts: PrivateServer, url: str, load: BackgroundLoad, work: Path) -> dict:
    """A body over max_request_size and an image over max_pixels, while the load runs."""
    limit = int(_prop(ts, "max_request_size"))
    t_a = load.now()
    big = work / "over-limit.bin"
    big.write_bytes(os.urandom(limit + 1024))
    big_status, big_body = post_file_with_curl(url, big)
    try:
        answer = httpclient.request("POST", url, huge_pixels_png(), {"Content-Type": "image/png"}, timeout=60)
        pix_status, pix_body = answer.status, answer.body
    except httpclient.NoAnswer as e:
        pix_status, pix_body = 0, str(e).encode()
    time.sleep(3)  # the others' requests after the over-limit ones count too
    t_b = load.now()
    during = load.wait_answered(t_b).window(t_a, t_b)
    return {
        "max_request_size": limit,
        "body_status": big_status,
        "body_answer": big_body[:200].decode(errors="replace") or "(empty body)",
        "pixels_status": pix_status,
        "pixels_answer": pix_body[:200].decode(errors="replace"),
        "others_requests": during.requests,
        "others_errors": during.errors,
    }


def _restart(ts: PrivateServer, load: BackgroundLoad) -> dict:
    """Stop and restart the server on the same ports with the load still running; stops the load."""
    stop_t = load.now()
    ts.stop()
    down_t = load.now()
    time.sleep(2)  # down for a moment, as a rolling restart would be
    restart_t0 = time.monotonic()
    ts.start()
    restart_ready = time.monotonic() - restart_t0

    def first_ok() -> float | None:
        r = load.records()
        after = r.done[r.ok & (r.done > down_t + 2)]
        return float(after.min()) if len(after) else None

    ok_t = first_ok()
    while ok_t is None and load.now() < down_t + 120:
        time.sleep(0.2)
        ok_t = first_ok()
    time.sleep(5)  # the rate the clients see once it is back
    recs = load.stop()
    last = float(recs.done.max())
    return {
        "stop_s": down_t - stop_t,
        "ready_after_start_s": restart_ready,
        "clients_first_success_after_stop_s": None if ok_t is None else ok_t - down_t,
        "failed_while_down": recs.window(stop_t, ok_t if ok_t is not None else last).errors,
        "rps_last_5s": recs.window(last - 5, last).rps,
    }


def _fault_passed(out: dict, max_failed: int) -> bool:
    k, o = out["kill_worker"], out["over_limit"]
    return bool(
        k["worker_ready_s"] is not None
        and k["throughput_recovered_s"] is not None
        and k["failed_requests"] <= max_failed
        and 400 <= o["body_status"] < 500
        and 400 <= o["pixels_status"] < 500
        and o["others_errors"] == 0
        and out["restart"]["clients_first_success_after_stop_s"] is not None
    )


# ---- attack --------------------------------------------------------------------------------------
def attack(args: argparse.Namespace) -> dict:
    from loadtest.attacks import archive_settings, content_type, request_cases

    model = args.run
    limits, contract = archive_settings(Path(args.model_store) / f"{model}.mar")
    bodies = [p["body"] for p in request_cases(limits, contract).values()]
    out: dict = {"run": model, "attackers": args.attackers, "attack_bodies": len(bodies), "limits": asdict(limits)}
    with tempfile.TemporaryDirectory(prefix="attack-") as tmp, PrivateServer(Path(args.model_store), [model]) as ts:
        work = Path(tmp)
        images, out["images"] = write_images(model, args.data_dir, work / "images", Path(args.artifacts_dir))
        peak = max_rps(ts, model, images, work)
        rate = args.share * peak["rps"]
        url = f"{ts.url}/predictions/{model}"
        pids, deaths = sorted(ts.worker_pids(model)), len(worker_deaths(_server(ts)))
        print(
            f"attack {model}: max {peak['rps']:.0f} req/s; normal load {rate:.0f} req/s; "
            f"{args.attackers} attackers x {len(bodies)} costliest bodies",
            flush=True,
        )
        normal = users(url, [p.read_bytes() for p in images], rate, args)
        time.sleep(args.baseline)  # the normal users' latency before the attack
        attack_t = normal.now()
        # Closed loop on purpose: each attacker keeps one of the costliest requests in flight whatever
        # the server's speed, the most work N connections can hand it. At a fixed rate it would either
        # leave the server idle between requests or pile the requests up in this client, not the server.
        attackers = BackgroundLoad(
            Target.post(url, bodies, content_type=content_type), connections=args.attackers, timeout_s=60
        ).start()
        time.sleep(args.duration)
        answers = attackers.stop()
        end_t = normal.now()
        time.sleep(args.recovery)  # the normal users alone again
        records = normal.stop()
        restarted = sorted(ts.worker_pids(model)) != pids or len(worker_deaths(_server(ts))) > deaths
    before, during = records.window(1.0, attack_t), records.window(attack_t, end_t)
    # The second half of the recovery: what the attack left queued has been answered by then.
    after = records.window(end_t + args.recovery / 2, end_t + args.recovery)
    error_bytes = answers.size[~answers.ok]
    out.update(
        max_rps=peak["rps"],
        target_rps=rate,
        duration_s=args.duration,
        recovery_s=args.recovery,
        normal_before=asdict(before),
        normal_during=asdict(during),
        normal_after=asdict(after),
        normal_failed_by_status=statuses(records, attack_t, end_t, failed=True),
        attacker_requests=len(answers),
        attacker_statuses=statuses(answers),
        attacker_max_error_bytes=int(error_bytes.max(initial=0)),
        attacker_p50_ms=percentile_ms(latency_histogram(answers.latency_s), 50),
        attacker_max_ms=float(answers.latency_s.max(initial=0.0)) * 1e3,
        worker_restarted=restarted,
    )
    out["passed"] = attack_passed(
        out["normal_failed_by_status"], after, restarted, answers.status, out["attacker_max_error_bytes"]
    )
    return out


ATTACK_ALLOWED = (200, 400, 413, 415, 503)


def attack_passed(
    normal_failed_by_status: dict[str, int],
    after: Window,
    restarted: bool,
    attacker_statuses: np.ndarray,
    attacker_max_error_bytes: int,
) -> bool:
    """What a server with one queue per model can promise while the costliest admitted requests take
    their share of it: normal users who do not fit are refused at once with 503 (retryable), never
    left without an answer or failed otherwise; once the attack stops the normal load is served
    without errors again; no worker dies; attackers get only small 4xx/503 answers or 200. Normal
    users are not promised zero refusals: at 70 % of the maximum, attackers taking more than the other
    30 % leave them less than they ask for."""
    return bool(
        set(normal_failed_by_status) <= {"503"}
        and after.requests > 0
        and after.errors == 0
        and not restarted
        and len(attacker_statuses) > 0
        and np.isin(attacker_statuses, ATTACK_ALLOWED).all()
        and attacker_max_error_bytes <= 1024
    )


def attack_section(r: dict, command: str) -> str:
    b, d, a = r["normal_before"], r["normal_during"], r["normal_after"]
    lim = r["limits"]
    return "\n".join(
        [
            "## Attack run (`make fault`, attack scenario)",
            "",
            (
                f"Command: `{command}`, on {machine_line(r)}. {r['run']}: {r['attackers']} attackers "
                f"post the {r['attack_bodies']} costliest request bodies the archive's limits admit "
                f"(`loadtest/attacks.py`; {lim['max_request_pixels']:,} pixels per request, "
                f"{lim['max_batch_pixels']:,} "
                f"per model call), back to back, for {r['duration_s']:.0f} s, while normal users post held-out "
                f"images open loop at {r['target_rps']:.0f} req/s (max measured {r['max_rps']:.0f} req/s). Verdict: "
                f"{'PASS' if r['passed'] else 'FAIL'}."
            ),
            "",
            "| | requests | errors | req/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|",
            (
                f"| normal users, before | {b['requests']} | {b['errors']} | {b['rps']:.0f} | {b['p50_ms']:.1f} | "
                f"{b['p99_ms']:.1f} |"
            ),
            (
                f"| normal users, during the attack | {d['requests']} | **{d['errors']}** | {d['rps']:.0f} | "
                f"{d['p50_ms']:.1f} | {d['p99_ms']:.1f} |"
            ),
            (
                f"| normal users, {r['recovery_s'] / 2:.0f}-{r['recovery_s']:.0f} s after the attack | "
                f"{a['requests']} | **{a['errors']}** | {a['rps']:.0f} | {a['p50_ms']:.1f} | {a['p99_ms']:.1f} |"
            ),
            "",
            (
                f"Normal users' failures during the attack by status (0: no answer): {r['normal_failed_by_status']} "
                "(PASS needs every one to be a 503, the server's immediate refusal when the model's queue is full, "
                "and none after the attack)."
            ),
            (
                f"Attackers: {r['attacker_requests']} requests, answers by status {r['attacker_statuses']}, "
                f"largest error answer {r['attacker_max_error_bytes']} bytes, median {r['attacker_p50_ms']:.0f} ms, "
                f"slowest {r['attacker_max_ms']:.0f} ms. Worker restarted: **{r['worker_restarted']}**."
            ),
        ]
    )


def _prop(ts: PrivateServer, key: str) -> str:
    from serving.server import CONFIG_FILE, read_properties

    return read_properties(_server(ts).workdir / CONFIG_FILE)[key]


def fault_section(r: dict, command: str) -> str:
    k, o, s = r["kill_worker"], r["over_limit"], r["restart"]

    def f(x, fmt="{:.1f}"):
        return "never" if x is None else fmt.format(x)

    return "\n".join(
        [
            "## Fault run (`make fault`)",
            "",
            (
                f"Command: `{command}`, on {machine_line(r)}. {r['run']} under an open-loop load of "
                f"{r['target_rps']:.0f} req/s (max measured {r['max_rps']:.0f} req/s). Verdict: "
                f"{'PASS' if r['passed'] else 'FAIL'}."
            ),
            "",
            "| fault | result |",
            "|---|---|",
            (
                f"| SIGKILL 1 of {k['workers']} workers | {k['failed_requests']} failed"
                f"{' ' + str(k['failed_by_status']) if k['failed_by_status'] else ''} of "
                f"{k['requests_after']} requests in the {r.get('after_s', '')} s after; worker READY again after "
                f"{f(k['worker_ready_s'])} s; throughput "
                f"back to 80 % of {k['baseline_rps']:.0f} req/s (no errors) after {f(k['throughput_recovered_s'])} s |"
            ),
            (
                f"| body over max_request_size ({o['max_request_size']} B, curl) | HTTP {o['body_status']} "
                f"`{o['body_answer'][:80]}`; other requests meanwhile: {o['others_errors']} errors of "
                f"{o['others_requests']} |"
            ),
            f"| image over max_pixels (10000x10000 PNG) | HTTP {o['pixels_status']} `{o['pixels_answer'][:80]}` |",
            (
                f"| stop + restart on the same ports | stop took {s['stop_s']:.1f} s; ready (warm-up answered) "
                f"{s['ready_after_start_s']:.1f} s after start; clients' first success "
                f"{f(s['clients_first_success_after_stop_s'])} s after the stop; {s['failed_while_down']} requests "
                "failed meanwhile |"
            ),
        ]
    )


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def seconds(text: str) -> float:
    """A duration as locust's --run-time spells it: 600, 600s, 10m, 1h30m -> seconds. (Not locust's own
    ``parse_timespan``: importing locust monkey-patches threads and sockets for gevent, which the
    background load's thread and event loop must not get.)"""
    try:
        return float(text)
    except ValueError:
        pass
    m = _DURATION.fullmatch(text.strip())
    total = sum(float(v) * unit for v, unit in zip(m.groups(), (3600, 60, 1), strict=True) if v) if m else 0.0
    if total <= 0:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: write seconds (600) or 600s, 10m, 1h30m")
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.resilience", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument(
        "mode",
        choices=("soak", "fault", "attack"),
        help="soak: hours of steady load; fault: kill, over-limit, restart; attack: hostile bodies",
    )
    where = p.add_argument_group("model and outputs")
    where.add_argument("--run", default="digits", help="the served model (model-store/RUN.mar)")
    where.add_argument("--model-store", default="model_store", help="holds <run>.mar (make archive)")
    where.add_argument("--data-dir", default=None, help="dataset files for the posted images (default: data/)")
    where.add_argument("--artifacts-dir", default="artifacts", help="for the contract of synthesised images")
    where.add_argument("--reports", default="reports", help="writes reports/MODE.json")
    where.add_argument("--docs", default="docs/benchmarks.md", help="'' to skip the docs update")
    load = p.add_argument_group("load (all modes)")
    load.add_argument("--share", type=float, default=0.7, help="load as a share of the measured maximum")
    add_client_options(load)
    load.add_argument(
        "--duration",
        type=seconds,
        default=None,
        help="soak: 600, 600s, 10m, 1h30m (default: 10m); attack: seconds of attack (60)",
    )
    modes = p.add_argument_group("per mode")
    modes.add_argument("--attackers", type=int, default=4, help="attack: concurrent attackers")
    modes.add_argument("--window", type=float, default=10.0, help="soak: seconds per window")
    modes.add_argument("--baseline", type=float, default=10.0, help="fault: seconds of load before the kill")
    modes.add_argument(
        "--recovery",
        type=float,
        default=10.0,
        help="attack: seconds of normal load after the attack (errors in the second half fail it)",
    )
    modes.add_argument("--after", type=float, default=20.0, help="fault: seconds observed after the kill")
    modes.add_argument("--max-failed", type=int, default=50, help="fault: failed requests allowed after a kill")
    args = p.parse_args(argv)
    mar = Path(args.model_store) / f"{args.run}.mar"
    if not mar.is_file():
        print(f"error: {mar} not found; build it first: make archive RUN={args.run}", file=sys.stderr)
        return 2
    if args.duration is None:
        args.duration = 600.0 if args.mode == "soak" else 60.0
    try:
        wrk_binary()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = f"python -m loadtest.resilience {' '.join(sys.argv[1:] if argv is None else argv)}"
    run, section_of = {
        "soak": (soak, soak_section),
        "fault": (fault, fault_section),
        "attack": (attack, attack_section),
    }[args.mode]
    load_before = os.getloadavg()[0]
    result = run(args)
    result.update(
        command=command, after_s=args.after, machine=cpu_name(), load_before=load_before, load_after=os.getloadavg()[0]
    )
    section = section_of(result, command)
    Path(args.reports).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.reports) / f"{args.mode}.json", result)
    if args.docs:
        update_section(Path(args.docs), args.mode, section)
    print("\n" + section)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
