"""Soak and fault runs against a private TorchServe serving the shipped archive.

    python -m loadtest.resilience soak  [--run digits] [--duration 600] [--share 0.7]
    python -m loadtest.resilience fault [--run digits]

Both first measure the server's maximum with ``wrk`` (16 connections), then drive a paced load
(``PacedLoad``: Python threads on keep-alive connections, each request timed) at a share of it:

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
import http.client
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from loadtest.docs import update_section
from loadtest.torchserve import PrivateServer
from loadtest.wrk import run_wrk, write_images, write_wrk_script, wrk_binary
from training.cli import HelpFormatter
from training.files import atomic_write_json


# ---- the paced load ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    t: float          # seconds since the load started, when the answer came
    status: int       # HTTP status; 0 = no answer (connection refused/reset, timeout)
    latency_ms: float


class PacedLoad:
    """``threads`` clients, each posting a random body every ``threads / rate`` s (never faster; when a
    request takes longer the next goes at once), recording every answer."""

    def __init__(self, url: str, bodies: list[bytes], rate: float, threads: int = 8) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path
        self.bodies, self.rate, self.threads = bodies, rate, threads
        self.records: list[Record] = []   # list.append is atomic under the GIL
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self.t0 = 0.0

    def start(self) -> "PacedLoad":
        self.t0 = time.monotonic()
        for i in range(self.threads):
            t = threading.Thread(target=self._client, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self) -> list[Record]:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=15)
        return self.records

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _client(self, i: int) -> None:
        rng = random.Random(i)
        period = self.threads / self.rate
        next_at = time.monotonic() + rng.uniform(0, period)  # spread the threads' phases
        conn = None
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            next_at = max(next_at + period, time.monotonic() - period)
            start = time.monotonic()
            status = 0
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request("POST", self.path, body=rng.choice(self.bodies),
                             headers={"Content-Type": "application/octet-stream"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            end = time.monotonic()
            self.records.append(Record(end - self.t0, status, 1e3 * (end - start)))


# ---- analysis (pure functions) -------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    start: float
    end: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def window(records: list[Record], start: float, end: float) -> Window:
    inside = [r for r in records if start <= r.t < end]
    ok = [r.latency_ms for r in inside if r.status == 200]
    span = max(end - start, 1e-9)
    return Window(start, end, len(inside), sum(r.status != 200 for r in inside), len(ok) / span,
                  percentile(ok, 50), percentile(ok, 99))


def windows(records: list[Record], start: float, end: float, width: float) -> list[Window]:
    out, t = [], start
    while t + width <= end + 1e-9:
        out.append(window(records, t, t + width))
        t += width
    return out


def recovery_s(records: list[Record], fault_t: float, baseline_rps: float, width: float = 2.0,
               share: float = 0.8, horizon: float = 60.0) -> float | None:
    """Seconds after ``fault_t`` until a ``width``-second window again carries ``share`` of the
    baseline's successful req/s with no error; None if it never does within ``horizon``."""
    t = fault_t
    while t + width <= fault_t + horizon:
        w = window(records, t, t + width)
        if w.errors == 0 and w.rps >= share * baseline_rps and w.requests > 0:
            return t + width - fault_t
        t += width / 4
    return None


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


# ---- helpers on a running server -----------------------------------------------------------------
def worker_rss_mb(ts: PrivateServer, model: str) -> float:
    total = 0
    for pid in ts.worker_pids(model):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def max_rps(ts: PrivateServer, model: str, images: list[Path], work: Path, seconds: float = 8.0) -> dict:
    script = write_wrk_script(work / "post.lua")
    url = f"{ts.url}/predictions/{model}"
    run_wrk(url, images, 16, 2, script)  # warm-up
    w = run_wrk(url, images, 16, seconds, script)
    return {"rps": w["requests"] / (w["duration_us"] / 1e6), "p99_ms": w["p99_us"] / 1e3,
            "errors": w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]}


def post(url: str, body: bytes, ctype: str = "application/octet-stream", timeout: float = 60.0
         ) -> tuple[int, bytes]:
    from serving.server import http
    try:
        return http("POST", url, body, {"Content-Type": ctype}, timeout=timeout)
    except OSError as e:  # the server may close the connection on an oversized body
        return 0, str(e).encode()


def post_file_with_curl(url: str, path: Path) -> tuple[int, bytes]:
    """POST a large file with curl: a server may answer 413 and close before the upload ends, and
    curl (like browsers and most clients) still reads that answer where urllib sees a reset."""
    import subprocess
    proc = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-H",
                           "Content-Type: application/octet-stream", "--data-binary", f"@{path}", url],
                          capture_output=True, timeout=120)
    body, _, code = proc.stdout.rpartition(b"\n")
    return (int(code) if code.strip().isdigit() else 0), body


def huge_pixels_png(side: int = 10_000) -> bytes:
    """A tiny file (a black PNG compresses to ~100 kB) whose header claims side x side pixels."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (side, side), 0).save(buf, "PNG", optimize=False)
    return buf.getvalue()


# ---- soak ----------------------------------------------------------------------------------------
def soak(args) -> dict:
    model = args.run
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, \
            PrivateServer(Path(args.model_store), [model]) as ts:
        work = Path(tmp)
        images, source = write_images(model, args.data_dir, work / "images", Path(args.artifacts_dir))
        bodies = [p.read_bytes() for p in images]
        peak = max_rps(ts, model, images, work)
        rate = args.share * peak["rps"]
        print(f"soak {model}: max {peak['rps']:.0f} req/s (wrk, 16 connections); driving {rate:.0f} req/s "
              f"for {args.duration:.0f} s", flush=True)
        load = PacedLoad(f"{ts.url}/predictions/{model}", bodies, rate, threads=args.threads).start()
        rss: list[tuple[float, float]] = []
        while load.now() < args.duration:
            rss.append((load.now(), worker_rss_mb(ts, model)))
            time.sleep(min(args.window, max(0.0, args.duration - load.now())))
        records = load.stop()
        rss.append((load.now(), worker_rss_mb(ts, model)))
    ws = windows(records, 0.0, args.duration, args.window)
    total = window(records, 0.0, args.duration + 30)
    growth = rss_growth(rss, warmup_s=min(60.0, args.duration / 5))
    result = {
        "run": model, "images": source, "duration_s": args.duration, "max_rps": peak["rps"],
        "target_rps": rate, "achieved_rps": total.rps, "requests": total.requests, "errors": total.errors,
        "p50_ms": total.p50_ms, "p99_ms": total.p99_ms, "worker_rss_mb": rss, "rss_growth": growth,
        "p99_stable": p99_stable(ws), "windows": [asdict(w) for w in ws],
    }
    result["passed"] = (total.errors == 0 and growth is not None and growth < 0.10 and result["p99_stable"])
    return result


def soak_section(r: dict, command: str) -> str:
    ws = r["windows"]
    rows = ["| window (s) | req/s | errors | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    step = max(1, len(ws) // 12)
    rows += [f"| {w['start']:.0f}-{w['end']:.0f} | {w['rps']:.0f} | {w['errors']} | {w['p50_ms']:.1f} | "
             f"{w['p99_ms']:.1f} |" for w in ws[::step]]
    rss = r["worker_rss_mb"]
    growth = f"{r['rss_growth']:+.1%}" if r["rss_growth"] is not None else "n/a"
    return "\n".join([
        "## Soak (`make soak`)", "",
        f"Command: `{command}`, on the shared, noisy 2-core machine. {r['run']}: max {r['max_rps']:.0f} req/s "
        f"(wrk, 16 connections); paced load at {r['target_rps']:.0f} req/s for {r['duration_s']:.0f} s "
        f"(achieved {r['achieved_rps']:.0f} req/s): {r['requests']} requests, **{r['errors']} errors**, "
        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms; worker RSS {rss[0][1]:.0f} MB at start, "
        f"{rss[-1][1]:.0f} MB at the end, growth after warm-up {growth}; p99 stable: {r['p99_stable']}. "
        f"Verdict: {'PASS' if r['passed'] else 'FAIL'}. Images: {r['images']}.", "", *rows])


# ---- faults --------------------------------------------------------------------------------------
def fault(args) -> dict:
    """Under a paced load at ``--share`` of the measured maximum: kill a worker, send over-limit
    requests, restart the server; what clients saw at each step."""
    model = args.run
    out: dict = {"run": model}
    with tempfile.TemporaryDirectory(prefix="fault-") as tmp:
        work = Path(tmp)
        images, out["images"] = write_images(model, args.data_dir, work / "images", Path(args.artifacts_dir))
        bodies = [p.read_bytes() for p in images]
        ts = PrivateServer(Path(args.model_store), [model], workdir=work / "ts").start()
        try:
            out["initial_ready_s"] = ts.ready_s
            peak = max_rps(ts, model, images, work)
            rate = args.share * peak["rps"]
            out.update(max_rps=peak["rps"], target_rps=rate)
            url = f"{ts.url}/predictions/{model}"
            print(f"fault {model}: max {peak['rps']:.0f} req/s; load {rate:.0f} req/s", flush=True)
            load = PacedLoad(url, bodies, rate, threads=args.threads).start()
            time.sleep(args.baseline)
            for step, run_step in (("kill_worker", lambda: _kill_worker(ts, model, load, args)),
                                   ("over_limit", lambda: _over_limit(ts, url, load, work)),
                                   ("restart", lambda: _restart(ts, load))):
                out[step] = run_step()
                print(f"  {step}: {out[step]}", flush=True)
        finally:
            ts.stop()
    out["passed"] = _fault_passed(out, args.max_failed)
    return out


def _kill_worker(ts: PrivateServer, model: str, load: PacedLoad, args) -> dict:
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
    recs = list(load.records)
    base = window(recs, kill_t - args.baseline + 2, kill_t)
    after = window(recs, kill_t, kill_t + args.after)
    return {"workers": len(pids), "killed_pid": pids[0], "baseline_rps": base.rps,
            "baseline_errors": base.errors, "failed_requests": after.errors, "requests_after": after.requests,
            "worker_ready_s": None if ready_t is None else ready_t - kill_t,
            "throughput_recovered_s": recovery_s(recs, kill_t, base.rps),
            "rps_last_5s": window(recs, load.now() - 5, load.now()).rps}


def _over_limit(ts: PrivateServer, url: str, load: PacedLoad, work: Path) -> dict:
    """A body over max_request_size and an image over max_pixels, while the load runs."""
    limit = int(_prop(ts, "max_request_size"))
    t_a = load.now()
    big = work / "over-limit.bin"
    big.write_bytes(os.urandom(limit + 1024))
    big_status, big_body = post_file_with_curl(url, big)
    pix_status, pix_body = post(url, huge_pixels_png(), "image/png")
    time.sleep(3)
    during = window(list(load.records), t_a, load.now())
    return {"max_request_size": limit, "body_status": big_status,
            "body_answer": big_body[:200].decode(errors="replace") or "(empty body)",
            "pixels_status": pix_status, "pixels_answer": pix_body[:200].decode(errors="replace"),
            "others_requests": during.requests, "others_errors": during.errors}


def _restart(ts: PrivateServer, load: PacedLoad) -> dict:
    """Stop and restart the server on the same ports with the load still running; stops the load."""
    stop_t = load.now()
    ts.stop()
    down_t = load.now()
    time.sleep(2)
    restart_t0 = time.monotonic()
    ts.start()
    restart_ready = time.monotonic() - restart_t0
    first_ok = None
    while load.now() < down_t + 120 and first_ok is None:
        first_ok = next((r.t for r in list(load.records) if r.t > down_t + 2 and r.status == 200), None)
        time.sleep(0.2)
    time.sleep(5)
    recs = load.stop()
    return {"stop_s": down_t - stop_t, "ready_after_start_s": restart_ready,
            "clients_first_success_after_stop_s": None if first_ok is None else first_ok - down_t,
            "failed_while_down": window(recs, stop_t, (first_ok or load.now())).errors,
            "rps_last_5s": window(recs, recs[-1].t - 5, recs[-1].t).rps}


def _fault_passed(out: dict, max_failed: int) -> bool:
    k, o = out["kill_worker"], out["over_limit"]
    return bool(k["worker_ready_s"] is not None and k["throughput_recovered_s"] is not None
                and k["failed_requests"] <= max_failed
                and 400 <= o["body_status"] < 500 and 400 <= o["pixels_status"] < 500 and o["others_errors"] == 0
                and out["restart"]["clients_first_success_after_stop_s"] is not None)


# ---- attack --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackRecord:
    name: str
    status: int
    bytes: int
    latency_ms: float


def _attacker(url: str, bodies: list[tuple[str, bytes]], stop: threading.Event, out: list, seed: int) -> None:
    """Posts the costliest admitted requests back to back (closed loop: one in flight per attacker)."""
    from loadtest.attacks import content_type

    rng = random.Random(seed)
    parts = urllib.parse.urlsplit(url)
    conn = None
    while not stop.is_set():
        name, body = rng.choice(bodies)
        start, status, size = time.monotonic(), 0, 0
        try:
            if conn is None:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            conn.request("POST", parts.path, body=body, headers={"Content-Type": content_type(body)})
            resp = conn.getresponse()
            size, status = len(resp.read()), resp.status
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
        out.append(AttackRecord(name, status, size, 1e3 * (time.monotonic() - start)))


def worker_deaths(ts: PrivateServer) -> int:
    path = ts.workdir / "logs" / "ts_log.log"
    text = path.read_text(errors="replace") if path.is_file() else ""
    return sum(any(m in line for m in ("Worker disconnected", "died", "Auto recovery"))
               for line in text.splitlines())


def attack(args) -> dict:
    from loadtest.attacks import archive_settings, request_cases

    model = args.run
    limits, contract = archive_settings(Path(args.model_store) / f"{model}.mar")
    bodies = [(name, p["body"]) for name, p in request_cases(limits, contract).items()]
    from training.machine import cpu_name

    out: dict = {"run": model, "attackers": args.attackers, "attack_bodies": len(bodies),
                 "limits": asdict(limits), "cpu": cpu_name()}
    with tempfile.TemporaryDirectory(prefix="attack-") as tmp, \
            PrivateServer(Path(args.model_store), [model]) as ts:
        work = Path(tmp)
        images, out["images"] = write_images(model, args.data_dir, work / "images", Path(args.artifacts_dir))
        peak = max_rps(ts, model, images, work)
        rate = args.share * peak["rps"]
        url = f"{ts.url}/predictions/{model}"
        pids, deaths = sorted(ts.worker_pids(model)), worker_deaths(ts)
        print(f"attack {model}: max {peak['rps']:.0f} req/s; normal load {rate:.0f} req/s; "
              f"{args.attackers} attackers x {len(bodies)} costliest bodies", flush=True)
        load = PacedLoad(url, [p.read_bytes() for p in images], rate, threads=args.threads).start()
        time.sleep(args.baseline)
        attack_t, stop, answers = load.now(), threading.Event(), []
        threads = [threading.Thread(target=_attacker, args=(url, bodies, stop, answers, i), daemon=True)
                   for i in range(args.attackers)]
        for t in threads:
            t.start()
        time.sleep(args.duration)
        stop.set()
        for t in threads:
            t.join(timeout=90)
        end_t = load.now()
        records = load.stop()
        restarted = sorted(ts.worker_pids(model)) != pids or worker_deaths(ts) > deaths
    before, during = window(records, 1.0, attack_t), window(records, attack_t, end_t)
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
    errors = [a for a in answers if a.status != 200]
    out.update(max_rps=peak["rps"], target_rps=rate, duration_s=args.duration,
               normal_before=asdict(before), normal_during=asdict(during),
               attacker_requests=len(answers), attacker_statuses=statuses,
               attacker_max_error_bytes=max((a.bytes for a in errors), default=0),
               attacker_p50_ms=percentile([a.latency_ms for a in answers], 50),
               attacker_max_ms=max((a.latency_ms for a in answers), default=0.0),
               worker_restarted=restarted)
    allowed = {200, 400, 413, 415, 503}
    out["passed"] = bool(during.errors == 0 and not restarted and answers
                         and all(a.status in allowed for a in answers)
                         and out["attacker_max_error_bytes"] <= 1024)
    return out


def attack_section(r: dict, command: str) -> str:
    b, d = r["normal_before"], r["normal_during"]
    lim = r["limits"]
    return "\n".join([
        "## Attack run (`make fault`, attack scenario)", "",
        f"Command: `{command}`, {r.get('cpu', '')}, on the shared, noisy 2-core machine. {r['run']}: {r['attackers']} attackers "
        f"post the {r['attack_bodies']} costliest request bodies the archive's limits admit "
        f"(`loadtest/attacks.py`; {lim['max_request_pixels']:,} pixels per request, {lim['max_batch_pixels']:,} "
        f"per model call), back to back, for {r['duration_s']:.0f} s, while normal users post held-out "
        f"images at {r['target_rps']:.0f} req/s (max measured {r['max_rps']:.0f} req/s). Verdict: "
        f"{'PASS' if r['passed'] else 'FAIL'}.", "",
        "| | requests | errors | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|",
        f"| normal users, before | {b['requests']} | {b['errors']} | {b['rps']:.0f} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} |",
        f"| normal users, during the attack | {d['requests']} | **{d['errors']}** | {d['rps']:.0f} | "
        f"{d['p50_ms']:.1f} | {d['p99_ms']:.1f} |", "",
        f"Attackers: {r['attacker_requests']} requests, answers by status {r['attacker_statuses']}, "
        f"largest error answer {r['attacker_max_error_bytes']} bytes, median {r['attacker_p50_ms']:.0f} ms, "
        f"slowest {r['attacker_max_ms']:.0f} ms. Worker restarted: **{r['worker_restarted']}**.",
    ])


def _prop(ts: PrivateServer, key: str) -> str:
    from serving.server import CONFIG_FILE, read_properties
    return read_properties(ts.workdir / CONFIG_FILE)[key]


def fault_section(r: dict, command: str) -> str:
    k, o, s = r["kill_worker"], r["over_limit"], r["restart"]

    def f(x, fmt="{:.1f}"):
        return "never" if x is None else fmt.format(x)
    return "\n".join([
        "## Fault run (`make fault`)", "",
        f"Command: `{command}`, on the shared, noisy 2-core machine. {r['run']} under a paced load of "
        f"{r['target_rps']:.0f} req/s (max measured {r['max_rps']:.0f} req/s). Verdict: "
        f"{'PASS' if r['passed'] else 'FAIL'}.", "",
        "| fault | result |", "|---|---|",
        f"| SIGKILL 1 of {k['workers']} workers | {k['failed_requests']} failed of {k['requests_after']} requests "
        f"in the {r.get('after_s', '')} s after; worker READY again after {f(k['worker_ready_s'])} s; throughput "
        f"back to 80 % of {k['baseline_rps']:.0f} req/s (no errors) after {f(k['throughput_recovered_s'])} s |",
        f"| body over max_request_size ({o['max_request_size']} B, curl) | HTTP {o['body_status']} "
        f"`{o['body_answer'][:80]}`; other requests meanwhile: {o['others_errors']} errors of "
        f"{o['others_requests']} |",
        f"| image over max_pixels (10000x10000 PNG) | HTTP {o['pixels_status']} `{o['pixels_answer'][:80]}` |",
        f"| stop + restart on the same ports | stop took {s['stop_s']:.1f} s; ready (warm-up answered) "
        f"{s['ready_after_start_s']:.1f} s after start; clients' first success {f(s['clients_first_success_after_stop_s'])} "
        f"s after the stop; {s['failed_while_down']} requests failed meanwhile |",
    ])


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def seconds(text: str) -> float:
    """A duration as locust's --run-time spells it: 600, 600s, 10m, 1h30m -> seconds. (Not locust's own
    ``parse_timespan``: importing locust monkey-patches threads and sockets for gevent, which the paced
    load's threads must not get.)"""
    try:
        return float(text)
    except ValueError:
        pass
    m = _DURATION.fullmatch(text.strip())
    total = sum(float(v) * unit for v, unit in zip(m.groups(), (3600, 60, 1)) if v) if m else 0.0
    if total <= 0:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: write seconds (600) or 600s, 10m, 1h30m")
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.resilience", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("mode", choices=("soak", "fault", "attack"),
                   help="soak: hours of steady load; fault: kill, over-limit, restart; attack: hostile bodies")
    where = p.add_argument_group("model and outputs")
    where.add_argument("--run", default="digits", help="the served model (model-store/RUN.mar)")
    where.add_argument("--model-store", default="model_store", help="holds <run>.mar (make archive)")
    where.add_argument("--data-dir", default=None, help="dataset files for the posted images (default: data/)")
    where.add_argument("--artifacts-dir", default="artifacts", help="for the contract of synthesised images")
    where.add_argument("--reports", default="reports", help="writes reports/MODE.json")
    where.add_argument("--docs", default="docs/benchmarks.md", help="'' to skip the docs update")
    load = p.add_argument_group("load (all modes)")
    load.add_argument("--share", type=float, default=0.7, help="load as a share of the measured maximum")
    load.add_argument("--threads", type=int, default=8, help="client threads of the paced load")
    load.add_argument("--duration", type=seconds, default=None,
                      help="soak: 600, 600s, 10m, 1h30m (default: 10m); attack: seconds of attack (60)")
    modes = p.add_argument_group("per mode")
    modes.add_argument("--attackers", type=int, default=4, help="attack: concurrent attackers")
    modes.add_argument("--window", type=float, default=10.0, help="soak: seconds per window")
    modes.add_argument("--baseline", type=float, default=10.0, help="fault: seconds of load before the kill")
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
    run, section_of = {"soak": (soak, soak_section), "fault": (fault, fault_section),
                       "attack": (attack, attack_section)}[args.mode]
    result = run(args)
    result["command"], result["after_s"] = command, args.after
    section = section_of(result, command)
    Path(args.reports).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.reports) / f"{args.mode}.json", result)
    if args.docs:
        update_section(Path(args.docs), args.mode, section)
    print("\n" + section)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
