"""Open-loop HTTP load: requests leave on a schedule, latency counts from the *intended* send time.

A closed-loop generator (wrk, locust, hey) sends the next request only when an answer came back, so
while a server stalls it stops sending and the stall shows up in one request per connection
(coordinated omission: Gil Tene's wrk2 notes; Schroeder et al., "Open Versus Closed", NSDI'06). Here
the arrival times are fixed before the run (Poisson or constant, ``arrival_times``), every request is
sent when its time comes whatever the server is doing (on an idle keep-alive connection, a new one,
or -- past ``max_connections`` -- queued in the client, which counts as waiting), and its latency is
``answer time - intended send time``, recorded in an HDR histogram. MLPerf Inference's server
scenario measures the same way.

No pip-installable open-loop generator fits here: locust and molotov are closed-loop, k6 is not on
PyPI (and is AGPL), vegeta is a Go program with constant arrivals only. This one is one asyncio loop
with a minimal HTTP/1.1 client (keep-alive, Content-Length framing), cheap enough for a few thousand
requests/s; it reports its own CPU use and how late it sent (``send_lag_p99_ms``), because it shares
the cores with the server it loads.

    python -m loadtest.openloop --url http://127.0.0.1:8080/predictions/digits --rate 500 \
        --duration 10 --images-run digits
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np
from hdrh.histogram import HdrHistogram

from training.cli import HelpFormatter

ARRIVALS = ("poisson", "constant")
# Latencies are recorded in microseconds, 1 us .. 120 s, 3 significant digits (0.1 % error).
_HDR_MAX_US, _HDR_DIGITS = 120_000_000, 3


def arrival_times(rate_rps: float, duration_s: float, process: str = "poisson", seed: int = 0) -> np.ndarray:
    """Intended send times in seconds from the start, in ``[0, duration_s)``.

    Args:
        rate_rps: mean arrivals per second.
        process: "poisson" (exponential gaps, as MLPerf's server scenario) or "constant" (equal gaps).
    """
    if rate_rps <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate_rps} req/s for {duration_s} s")
    if process == "constant":
        return np.arange(0.0, duration_s, 1.0 / rate_rps)
    if process != "poisson":
        raise ValueError(f"arrival process must be one of {ARRIVALS}, got {process!r}")
    rng = np.random.default_rng(seed)
    n = int(rate_rps * duration_s * 1.2 + 10 * math.sqrt(rate_rps * duration_s) + 10)  # enough gaps
    t = np.cumsum(rng.exponential(1.0 / rate_rps, n))
    while t[-1] < duration_s:  # astronomically rare; extend rather than cut the schedule short
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate_rps, n))])
    return t[t < duration_s]


@dataclass(frozen=True)
class Target:
    """Where to send and what: one prebuilt HTTP/1.1 request per body, sent in turn."""

    host: str
    port: int
    requests: tuple[bytes, ...]

    @classmethod
    def post(cls, url: str, bodies: Sequence[bytes], headers: dict[str, str] | None = None) -> "Target":
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"url must be http://HOST:PORT/PATH, got {url!r}")
        port = u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        head = {"Host": f"{u.hostname}:{port}", "Content-Type": "application/octet-stream", **(headers or {})}
        reqs = []
        for body in bodies:
            lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()),
                     f"Content-Length: {len(body)}", "", ""]
            reqs.append("\r\n".join(lines).encode("latin-1") + body)
        if not reqs:
            raise ValueError("no request bodies to send")
        return cls(u.hostname, port, tuple(reqs))


@dataclass
class RunResult:
    """One run. Latency percentiles in ms from the intended send time, over the measured window."""

    mode: str                 # "open" (scheduled arrivals) or "closed" (back-to-back per connection)
    arrivals: str
    offered_rps: float        # scheduled requests per second (closed loop: what it managed to send)
    achieved_rps: float       # successful answers per second completed inside the measured window
    duration_s: float
    sent: int                 # requests intended inside the measured window
    ok: int
    errors: int
    error_kinds: dict = field(default_factory=dict)
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    max_ms: float = 0.0
    send_lag_p99_ms: float = 0.0   # how late the generator itself sent (its own CPU starvation)
    generator_cpu: float = 0.0     # % of one core used by this process during the run
    connections: int = 0           # connections opened
    hdr: str = ""                  # the latency histogram, HdrHistogram's compressed base64 encoding

    def to_dict(self) -> dict:
        return asdict(self)


class _Conn(asyncio.Protocol):
    """One keep-alive connection: one request in flight at a time (HTTP/1.1 without pipelining)."""

    def __init__(self, owner: "_Client") -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.job: tuple[float, float] | None = None  # (intended time, actual send time)
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, job: tuple[float, float], request: bytes) -> None:
        self.job = job
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        length, close = None, False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if length is None:  # chunked or unframed: not spoken by the servers measured here
            self._fail("unframed_response")
            return
        if len(self.buf) < end + 4 + length:
            return
        try:
            status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            status = 0
        del self.buf[:end + 4 + length]
        job, self.job = self.job, None
        if close:
            self.closed = True
            self.transport.close()
        self.owner.done(self, job, status)

    def _fail(self, kind: str) -> None:
        job, self.job = self.job, None
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if job is not None:
            self.owner.failed(self, job, kind)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.job is not None:
            self._fail("connection_lost")
        self.owner.lost(self)


class _Client:
    """Dispatch: idle connections, new ones up to a cap, then a FIFO of requests waiting for one."""

    def __init__(self, target: Target, max_connections: int, timeout_s: float, window: tuple[float, float]) -> None:
        self.target, self.max_connections, self.timeout_s = target, max_connections, timeout_s
        self.window = window  # measured interval, in loop time, of intended send times
        self.idle: collections.deque[_Conn] = collections.deque()
        self.busy: set[_Conn] = set()
        self.opening = 0
        self.opened = 0
        self.waiting: collections.deque[tuple[float, float]] = collections.deque()  # (intended, -1)
        self.hist = HdrHistogram(1, _HDR_MAX_US, _HDR_DIGITS)
        self.lag = HdrHistogram(1, _HDR_MAX_US, _HDR_DIGITS)
        self.ok = self.errors = 0
        self.ok_completed_in_window = 0
        self.error_kinds: collections.Counter[str] = collections.Counter()
        self.outstanding = 0
        self.seq = 0
        self.loop = asyncio.get_running_loop()
        self.on_done = None  # closed loop: called after each answer

    def _measured(self, intended: float) -> bool:
        return self.window[0] <= intended < self.window[1]

    def submit(self, intended: float) -> None:
        self.outstanding += 1
        if self.idle:
            self._send(self.idle.pop(), intended)
            return
        self.waiting.append((intended, -1.0))  # served by the next free connection, oldest first
        if len(self.busy) + self.opening < self.max_connections:
            self._open()

    def _send(self, conn: _Conn, intended: float) -> None:
        now = self.loop.time()
        if self._measured(intended):
            self.lag.record_value(max(1, int((now - intended) * 1e6)))
        self.busy.add(conn)
        req = self.target.requests[self.seq % len(self.target.requests)]
        self.seq += 1
        conn.send((intended, now), req)

    def _open(self) -> None:
        self.opening += 1

        async def connect():
            try:
                _, conn = await self.loop.create_connection(lambda: _Conn(self), self.target.host, self.target.port)
            except OSError as e:
                self.opening -= 1
                if self.waiting:
                    intended, _ = self.waiting.popleft()
                    self._record_error(intended, f"connect_error:{type(e).__name__}")
                return
            self.opening -= 1
            self.opened += 1
            self._next(conn)

        self.loop.create_task(connect())

    def _next(self, conn: _Conn) -> None:
        """A connection became free: take the oldest waiting request, or go idle."""
        self.busy.discard(conn)
        if conn.closed:
            if self.waiting and len(self.busy) + self.opening < self.max_connections:
                self._open()
            return
        if self.waiting:
            intended, _ = self.waiting.popleft()
            self._send(conn, intended)
        else:
            self.idle.append(conn)

    def done(self, conn: _Conn, job: tuple[float, float], status: int) -> None:
        intended, _sent = job
        now = self.loop.time()
        self.outstanding -= 1
        if self._measured(intended):
            if 200 <= status < 300:
                self.ok += 1
                self.hist.record_value(max(1, int((now - intended) * 1e6)))
            else:
                self.errors += 1
                self.error_kinds[f"http_{status}"] += 1
        if 200 <= status < 300 and self.window[0] <= now < self.window[1]:
            self.ok_completed_in_window += 1
        if self.on_done is not None:
            self.on_done(job, now, status)
        self._next(conn)

    def _record_error(self, intended: float, kind: str) -> None:
        self.outstanding -= 1
        if self._measured(intended):
            self.errors += 1
            self.error_kinds[kind] += 1

    def failed(self, conn: _Conn, job: tuple[float, float], kind: str) -> None:
        self._record_error(job[0], kind)

    def lost(self, conn: _Conn) -> None:
        """The connection closed; replace it if requests wait (unless ``_next`` already did)."""
        tracked = conn in self.busy or conn in self.idle
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if tracked and self.waiting and len(self.busy) + self.opening < self.max_connections:
            self._open()

    def expire(self) -> None:
        """Fail requests older than the timeout: in flight (the connection is dropped) or waiting."""
        now = self.loop.time()
        for conn in list(self.busy):
            if conn.job is not None and now - conn.job[0] > self.timeout_s:
                conn._fail("timeout")
        while self.waiting and now - self.waiting[0][0] > self.timeout_s:
            intended, _ = self.waiting.popleft()
            self._record_error(intended, "timeout")

    def close(self) -> None:
        for conn in [*self.idle, *self.busy]:
            if conn.transport is not None:
                conn.transport.close()


def _percentiles(client: _Client) -> dict:
    h = client.hist
    n = h.get_total_count()
    ms = (lambda q: h.get_value_at_percentile(q) / 1e3) if n else (lambda q: 0.0)
    return {"p50_ms": ms(50), "p90_ms": ms(90), "p99_ms": ms(99), "p999_ms": ms(99.9),
            "max_ms": h.get_max_value() / 1e3 if n else 0.0,
            "send_lag_p99_ms": client.lag.get_value_at_percentile(99) / 1e3 if client.lag.get_total_count() else 0.0,
            "hdr": h.encode().decode() if n else ""}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _open_loop(target: Target, rate_rps: float, duration_s: float, warmup_s: float, arrivals: str,
                     max_connections: int, timeout_s: float, seed: int) -> RunResult:
    loop = asyncio.get_running_loop()
    offsets = arrival_times(rate_rps, warmup_s + duration_s, arrivals, seed)
    t0 = loop.time() + 0.05
    client = _Client(target, max_connections, timeout_s, (t0 + warmup_s, t0 + warmup_s + duration_s))
    cpu0, wall0 = _cpu_s(), time.monotonic()
    last_expire = t0
    i, n = 0, len(offsets)
    while i < n:
        now = loop.time()
        # Send everything that is due (a late wake-up sends a burst: the schedule is not stretched).
        while i < n and t0 + offsets[i] <= now:
            client.submit(t0 + offsets[i])
            i += 1
        if now - last_expire > 0.1:
            client.expire()
            last_expire = now
        if i < n:
            await asyncio.sleep(max(0.0, t0 + offsets[i] - loop.time()))
    deadline = loop.time() + timeout_s + 1
    while client.outstanding > 0 and loop.time() < deadline:  # drain: late answers still count
        await asyncio.sleep(0.01)
        client.expire()
    cpu, wall = _cpu_s() - cpu0, time.monotonic() - wall0
    client.close()
    sent = int(np.count_nonzero((offsets >= warmup_s) & (offsets < warmup_s + duration_s)))
    return RunResult("open", arrivals, sent / duration_s, client.ok_completed_in_window / duration_s, duration_s,
                     sent, client.ok, client.errors, dict(client.error_kinds),
                     generator_cpu=100 * cpu / wall, connections=client.opened, **_percentiles(client))


async def _closed_loop(target: Target, connections: int, duration_s: float, warmup_s: float,
                       timeout_s: float) -> RunResult:
    """``connections`` requests in flight, each sent when the previous answer arrived; latency from
    the actual send (what wrk/locust report). Used to show what a closed loop hides."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    end = t0 + warmup_s + duration_s
    client = _Client(target, connections, timeout_s, (t0 + warmup_s, end))
    cpu0, wall0 = _cpu_s(), time.monotonic()
    sent_in_window = 0

    def again(job, now, status):
        nonlocal sent_in_window
        if now < end:
            if now >= t0 + warmup_s:
                sent_in_window += 1
            client.submit(now)  # the "intended" time is the actual send: closed-loop accounting

    client.on_done = again
    for _ in range(connections):
        client.submit(t0)
    while loop.time() < end:
        await asyncio.sleep(0.05)
        client.expire()
    deadline = loop.time() + timeout_s
    while client.outstanding > 0 and loop.time() < deadline:
        await asyncio.sleep(0.01)
    cpu, wall = _cpu_s() - cpu0, time.monotonic() - wall0
    client.close()
    return RunResult("closed", f"{connections} connections", sent_in_window / duration_s,
                     client.ok_completed_in_window / duration_s, duration_s, sent_in_window, client.ok,
                     client.errors, dict(client.error_kinds), generator_cpu=100 * cpu / wall,
                     connections=client.opened, **_percentiles(client))


def run_open_loop(target: Target, rate_rps: float, duration_s: float, warmup_s: float = 2.0,
                  arrivals: str = "poisson", max_connections: int = 256, timeout_s: float = 10.0,
                  seed: int = 0) -> RunResult:
    """Send ``rate_rps`` requests/s for ``warmup_s + duration_s`` seconds on a fixed schedule; only
    requests intended after the warm-up are measured."""
    return asyncio.run(_open_loop(target, rate_rps, duration_s, warmup_s, arrivals, max_connections,
                                  timeout_s, seed))


def run_closed_loop(target: Target, connections: int, duration_s: float, warmup_s: float = 1.0,
                    timeout_s: float = 10.0) -> RunResult:
    return asyncio.run(_closed_loop(target, connections, duration_s, warmup_s, timeout_s))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.openloop", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--url", required=True, help="http://HOST:PORT/PATH to POST to")
    p.add_argument("--rate", type=float, help="requests/s (open loop); omit with --closed")
    p.add_argument("--closed", type=int, metavar="CONNECTIONS", help="closed loop instead, for comparison")
    p.add_argument("--arrivals", choices=ARRIVALS, default="poisson", help="inter-arrival distribution")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds sent before measuring")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections at most; a request that finds none waits (and its latency counts)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a request counts as failed")
    p.add_argument("--images-run", default="digits", help="post held-out PNGs of this run (loadtest.images)")
    p.add_argument("--body", action="append", default=[], help="a file to post instead (repeatable)")
    a = p.parse_args(argv)
    if (a.rate is None) == (a.closed is None):
        p.error("give exactly one of --rate (open loop) or --closed CONNECTIONS")
    if a.body:
        bodies = [open(f, "rb").read() for f in a.body]
    else:
        from loadtest.images import load_pool
        bodies = list(load_pool(a.images_run, limit=128).images)
    target = Target.post(a.url, bodies)
    r = (run_closed_loop(target, a.closed, a.duration, a.warmup, a.timeout) if a.closed
         else run_open_loop(target, a.rate, a.duration, a.warmup, a.arrivals, a.max_connections, a.timeout))
    doc = r.to_dict()
    doc.pop("hdr")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
