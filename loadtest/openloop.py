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

``BackgroundLoad`` runs the same client in a thread of its own until stopped and keeps every request
(``Records``), so that a caller can act on the server meanwhile (kill a worker, restart it) and cut
time windows afterwards: the soak, fault and attack runs (``loadtest.resilience``) use it.

    python -m loadtest.openloop --url http://127.0.0.1:8080/predictions/digits --rate 500 \
        --duration 10 --images-run digits
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import functools
import json
import math
import resource
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import numpy as np
from hdrh.histogram import HdrHistogram

from training.cli import HelpFormatter

ARRIVALS = ("poisson", "constant")
# Latencies are recorded in microseconds, 1 us .. 120 s, 3 significant digits (0.1 % error).
_HDR_MAX_US, _HDR_DIGITS = 120_000_000, 3
MAX_CONNECTIONS = 256  # open connections at most, by default; past them requests wait in the client
CHUNK_S = 10.0  # a background load draws its arrivals this many seconds at a time


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


def arrival_chunks(
    rate_rps: float, process: str = "poisson", seed: int = 0, chunk_s: float = CHUNK_S
) -> Iterator[np.ndarray]:
    """Intended send times without an end, ``chunk_s`` seconds at a time (each array shifted to its
    place). Poisson arrivals in disjoint intervals are independent, so the chunks join into one
    Poisson process; constant ones keep their gap when ``rate_rps * chunk_s`` is whole."""
    k = 0
    while True:
        yield k * chunk_s + arrival_times(rate_rps, chunk_s, process, seed + k)
        k += 1


@dataclass(frozen=True)
class Target:
    """Where to send and what: one prebuilt HTTP/1.1 request per body, sent in turn."""

    host: str
    port: int
    requests: tuple[bytes, ...]

    @classmethod
    def post(
        cls,
        url: str,
        bodies: Sequence[bytes],
        headers: dict[str, str] | None = None,
        content_type: Callable[[bytes], str] | None = None,
    ) -> Target:
        """POSTs of ``bodies`` to ``url``; ``content_type`` names each body's type where they differ."""
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"url must be http://HOST:PORT/PATH, got {url!r}")
        port = u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        head = {"Host": f"{u.hostname}:{port}", "Content-Type": "application/octet-stream", **(headers or {})}
        reqs = []
        for body in bodies:
            own = {"Content-Type": content_type(body)} if content_type else {}
            lines = [
                f"POST {path} HTTP/1.1",
                *(f"{k}: {v}" for k, v in {**head, **own}.items()),
                f"Content-Length: {len(body)}",
                "",
                "",
            ]
            reqs.append("\r\n".join(lines).encode("latin-1") + body)
        if not reqs:
            raise ValueError("no request bodies to send")
        return cls(u.hostname, port, tuple(reqs))


@dataclass
class RunResult:
    """One run. Latency percentiles in ms from the intended send time, over the measured window."""

    mode: str  # "open" (scheduled arrivals) or "closed" (back-to-back per connection)
    arrivals: str
    offered_rps: float  # scheduled requests per second (closed loop: what it managed to send)
    achieved_rps: float  # successful answers per second completed inside the measured window
    duration_s: float
    sent: int  # requests intended inside the measured window
    ok: int
    errors: int
    error_kinds: dict = field(default_factory=dict)
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    max_ms: float = 0.0
    send_lag_p99_ms: float = 0.0  # how late the generator itself sent (its own CPU starvation)
    generator_cpu: float = 0.0  # % of one core used by this process during the run
    connections: int = 0  # connections opened
    hdr: str = ""  # the latency histogram, HdrHistogram's compressed base64 encoding

    def to_dict(self) -> dict:
        return asdict(self)


class _Conn(asyncio.Protocol):
    """One keep-alive connection: one request in flight at a time (HTTP/1.1 without pipelining)."""

    def __init__(self, owner: _Client) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.job: tuple[float, float] | None = None  # (intended time, actual send time)
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, job: tuple[float, float], request: bytes) -> None:
        self.job = job
        assert self.transport is not None  # connection_made ran before create_connection returned it
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
        del self.buf[: end + 4 + length]
        if self.job is None:  # an answer to no request: this connection is out of step, drop it
            self._fail("unsolicited_response")
            return
        job, self.job = self.job, None
        if close:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self.owner.done(self, job, status, length)

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
        self.on_done: Callable[[float, int], None] | None = None  # closed loop: (time, status) of each outcome
        self.recorder: _Recorder | None = None  # a background load: every request kept
        self.sent_until = math.inf  # every request intended before this loop time was submitted

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

    def done(self, conn: _Conn, job: tuple[float, float], status: int, size: int) -> None:
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
        if self.recorder is not None:
            self.recorder.add(intended, now, status, size)
        if self.on_done is not None:
            self.on_done(now, status)
        self._next(conn)

    def _record_error(self, intended: float, kind: str) -> None:
        self.outstanding -= 1
        if self._measured(intended):
            self.errors += 1
            self.error_kinds[kind] += 1
        now = self.loop.time()
        if self.recorder is not None:
            self.recorder.add(intended, now, 0, 0)
        if self.on_done is not None:  # a closed loop keeps its count in flight after a failure too
            self.on_done(now, 0)

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

    def settled(self, until: float) -> bool:
        """Every request intended before ``until`` (loop time) was sent and answered or failed."""
        if self.sent_until < until:
            return False
        times = [c.job[0] for c in self.busy if c.job is not None]
        if self.waiting:
            times.append(self.waiting[0][0])
        return min(times, default=math.inf) >= until

    def close(self) -> None:
        for conn in [*self.idle, *self.busy]:
            if conn.transport is not None:
                conn.transport.close()


def percentile_ms(h: HdrHistogram, q: float) -> float:
    """The ``q``-th percentile (0-100) of a histogram of microseconds, in ms; 0.0 when it is empty.
    HdrHistogram's rank is the nearest one: the 99th of 1..100 is 99."""
    return h.get_value_at_percentile(q) / 1e3 if h.get_total_count() else 0.0


def latency_histogram(latencies_s: np.ndarray) -> HdrHistogram:
    """Latencies in seconds, recorded as the live client records them (us, 1 us .. 120 s)."""
    h = HdrHistogram(1, _HDR_MAX_US, _HDR_DIGITS)
    for us in np.clip(np.rint(np.asarray(latencies_s) * 1e6), 1, _HDR_MAX_US).astype(np.int64).tolist():
        h.record_value(us)
    return h


def _percentiles(client: _Client) -> dict:
    h = client.hist
    n = h.get_total_count()
    return {
        "p50_ms": percentile_ms(h, 50),
        "p90_ms": percentile_ms(h, 90),
        "p99_ms": percentile_ms(h, 99),
        "p999_ms": percentile_ms(h, 99.9),
        "max_ms": h.get_max_value() / 1e3 if n else 0.0,
        "send_lag_p99_ms": percentile_ms(client.lag, 99),
        "hdr": h.encode().decode() if n else "",
    }


def _run_result(
    mode: str, arrivals: str, sent: int, duration_s: float, client: _Client, generator_cpu: float
) -> RunResult:
    """A run's result from what its client recorded over the measured ``duration_s``."""
    return RunResult(
        mode,
        arrivals,
        sent / duration_s,
        client.ok_completed_in_window / duration_s,
        duration_s,
        sent,
        client.ok,
        client.errors,
        dict(client.error_kinds),
        generator_cpu=generator_cpu,
        connections=client.opened,
        **_percentiles(client),
    )


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _send_on_schedule(
    client: _Client, t0: float, schedule: Iterable[np.ndarray], stop: threading.Event | None = None
) -> int:
    """Submit each request when its time comes (``schedule``: arrays of seconds after ``t0``), until
    the schedule ends or ``stop`` is set; returns how many were sent."""
    loop = client.loop
    last_expire, sent = t0, 0
    client.sent_until = t0
    for offsets in schedule:
        i, n = 0, len(offsets)
        while i < n:
            if stop is not None and stop.is_set():
                client.sent_until = math.inf  # nothing more will leave
                return sent
            now = loop.time()
            # Send everything that is due (a late wake-up sends a burst: the schedule is not stretched).
            while i < n and t0 + offsets[i] <= now:
                client.submit(t0 + offsets[i])
                i += 1
                sent += 1
            client.sent_until = now
            if now - last_expire > 0.1:
                client.expire()
                last_expire = now
            if i < n:  # wakes at least every 0.1 s to expire requests and to see ``stop``
                await asyncio.sleep(min(0.1, max(0.0, t0 + offsets[i] - loop.time())))
    client.sent_until = math.inf
    return sent


async def _drain(client: _Client, timeout_s: float) -> None:
    """Wait for the requests still out: late answers still count, the rest expire."""
    deadline = client.loop.time() + timeout_s + 1
    while client.outstanding > 0 and client.loop.time() < deadline:
        await asyncio.sleep(0.01)
        client.expire()


async def _open_loop(
    target: Target,
    rate_rps: float,
    duration_s: float,
    warmup_s: float,
    arrivals: str,
    max_connections: int,
    timeout_s: float,
    seed: int,
) -> RunResult:
    loop = asyncio.get_running_loop()
    offsets = arrival_times(rate_rps, warmup_s + duration_s, arrivals, seed)
    t0 = loop.time() + 0.05
    client = _Client(target, max_connections, timeout_s, (t0 + warmup_s, t0 + warmup_s + duration_s))
    cpu0, wall0 = _cpu_s(), time.monotonic()
    await _send_on_schedule(client, t0, [offsets])
    await _drain(client, timeout_s)
    cpu, wall = _cpu_s() - cpu0, time.monotonic() - wall0
    client.close()
    sent = int(np.count_nonzero((offsets >= warmup_s) & (offsets < warmup_s + duration_s)))
    return _run_result("open", arrivals, sent, duration_s, client, 100 * cpu / wall)


async def _closed_loop(
    target: Target, connections: int, duration_s: float, warmup_s: float, timeout_s: float
) -> RunResult:
    """``connections`` requests in flight, each sent when the previous answer arrived; latency from
    the actual send (what wrk/locust report). Used to show what a closed loop hides."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    end = t0 + warmup_s + duration_s
    client = _Client(target, connections, timeout_s, (t0 + warmup_s, end))
    cpu0, wall0 = _cpu_s(), time.monotonic()
    sent_in_window = 0

    def again(now: float, status: int) -> None:
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
    return _run_result("closed", f"{connections} connections", sent_in_window, duration_s, client, 100 * cpu / wall)


def run_open_loop(
    target: Target,
    rate_rps: float,
    duration_s: float,
    warmup_s: float = 2.0,
    arrivals: str = "poisson",
    max_connections: int = MAX_CONNECTIONS,
    timeout_s: float = 10.0,
    seed: int = 0,
) -> RunResult:
    """Send ``rate_rps`` requests/s for ``warmup_s + duration_s`` seconds on a fixed schedule; only
    requests intended after the warm-up are measured."""
    return asyncio.run(_open_loop(target, rate_rps, duration_s, warmup_s, arrivals, max_connections, timeout_s, seed))


def run_closed_loop(
    target: Target, connections: int, duration_s: float, warmup_s: float = 1.0, timeout_s: float = 10.0
) -> RunResult:
    return asyncio.run(_closed_loop(target, connections, duration_s, warmup_s, timeout_s))


# ---- a load in the background, every request kept --------------------------------------------------
@dataclass(frozen=True)
class Window:
    """The requests meant to leave in ``[start, end)`` s: how many, how many failed, and the p50/p99 of
    the successful ones from the intended send (HdrHistogram, as ``RunResult``); ``rps`` is the
    successful answers that came in ``[start, end)``, per second (as ``RunResult.achieved_rps``)."""

    start: float
    end: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Records:
    """Every request of a load, times in seconds from its start: when it was meant to leave
    (``intended``), when its answer or failure came (``done``), the HTTP status (0: no answer) and the
    answer body's bytes."""

    intended: np.ndarray
    done: np.ndarray
    status: np.ndarray
    size: np.ndarray

    def __len__(self) -> int:
        return len(self.intended)

    @property
    def ok(self) -> np.ndarray:
        return (self.status >= 200) & (self.status < 300)

    @property
    def latency_s(self) -> np.ndarray:
        return self.done - self.intended

    def window(self, start: float, end: float) -> Window:
        mine = (self.intended >= start) & (self.intended < end)
        good = mine & self.ok
        completed = np.count_nonzero(self.ok & (self.done >= start) & (self.done < end))
        h = latency_histogram(self.latency_s[good])
        return Window(
            start,
            end,
            int(np.count_nonzero(mine)),
            int(np.count_nonzero(mine & ~self.ok)),
            float(completed / max(end - start, 1e-9)),
            percentile_ms(h, 50),
            percentile_ms(h, 99),
        )

    def windows(self, start: float, end: float, width: float) -> list[Window]:
        """Back-to-back windows of ``width`` s from ``start``; the last one ends by ``end``."""
        n = int((end - start) / width + 1e-9)
        return [self.window(start + i * width, start + (i + 1) * width) for i in range(n)]


class _Recorder:
    """Appends each outcome in the load's thread; copies them out under a lock in any thread."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self._lock = threading.Lock()
        self._intended, self._done = array("d"), array("d")
        self._status, self._size = array("i"), array("q")

    def add(self, intended: float, done: float, status: int, size: int) -> None:
        with self._lock:
            self._intended.append(intended - self.t0)
            self._done.append(done - self.t0)
            self._status.append(status)
            self._size.append(size)

    def snapshot(self) -> Records:
        with self._lock:
            return Records(np.array(self._intended), np.array(self._done), np.array(self._status), np.array(self._size))


class BackgroundLoad:
    """A load that runs in a thread of its own from ``start()`` to ``stop()``; ``records()`` at any time.

    Open loop (``rate_rps``): arrivals on a schedule without an end (``arrival_chunks``), latency from
    the intended send, as ``run_open_loop``. Closed loop (``connections``): that many requests always in
    flight, each sent when the previous one was answered or failed, as ``run_closed_loop``.
    """

    def __init__(
        self,
        target: Target,
        *,
        rate_rps: float | None = None,
        connections: int | None = None,
        arrivals: str = "poisson",
        max_connections: int = MAX_CONNECTIONS,
        timeout_s: float = 10.0,
        seed: int = 0,
    ) -> None:
        if (rate_rps is None) == (connections is None):
            raise ValueError("give exactly one of rate_rps (open loop) or connections (closed loop)")
        if (rate_rps is not None and rate_rps <= 0) or (connections is not None and connections < 1):
            raise ValueError(f"rate_rps must be > 0 and connections >= 1, got {rate_rps}, {connections}")
        self.target, self.rate_rps, self.connections = target, rate_rps, connections
        self.arrivals, self.max_connections = arrivals, connections or max_connections
        self.timeout_s, self.seed = timeout_s, seed
        self.t0 = 0.0
        self.result: RunResult | None = None  # the whole run's totals, once stopped
        self._stop, self._started = threading.Event(), threading.Event()
        self._recorder: _Recorder | None = None
        self._loop = asyncio.new_event_loop()
        # A daemon thread: a caller that dies without stop() does not hang the interpreter's exit.
        self._thread = threading.Thread(target=self._loop.run_forever, name="background-load", daemon=True)
        self._future: concurrent.futures.Future[RunResult] | None = None
        self._client: _Client | None = None

    def start(self) -> Self:
        self._thread.start()
        self._future = asyncio.run_coroutine_threadsafe(self._main(), self._loop)
        deadline = time.monotonic() + 30
        while not self._started.wait(0.05):
            if self._future.done():
                self._future.result()  # raises what stopped it before it began
            if time.monotonic() > deadline:
                raise RuntimeError("the background load did not start within 30 s")
        return self

    def now(self) -> float:
        """Seconds since the load started (the clock of its records)."""
        return time.monotonic() - self.t0

    def records(self) -> Records:
        if self._recorder is None:
            raise RuntimeError("the load has not started: call start() first")
        return self._recorder.snapshot()

    def wait_answered(self, until_s: float, timeout_s: float | None = None) -> Records:
        """Block until every request meant to leave before ``until_s`` (the load's clock) has been
        answered or has failed, so that a window ending there is complete; then its records. Requests
        fail after the load's timeout, so this returns within about that long."""
        deadline = time.monotonic() + (self.timeout_s + 5 if timeout_s is None else timeout_s)
        while time.monotonic() < deadline:
            if self._client is None or self._future is None or self._future.done():
                break
            settled = functools.partial(self._client.settled, self.t0 + until_s)
            if asyncio.run_coroutine_threadsafe(_call(settled), self._loop).result(5):
                break
            time.sleep(0.05)
        return self.records()

    def stop(self) -> Records:
        """Stop sending, wait for the answers still due (up to the timeout), return every record."""
        if self._future is None:
            raise RuntimeError("the load has not started: call start() first")
        self._stop.set()
        try:
            self.result = self._future.result(timeout=self.timeout_s + 30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()
        return self.records()

    async def _main(self) -> RunResult:
        loop = asyncio.get_running_loop()
        self.t0 = loop.time()  # asyncio's clock is time.monotonic(), which now() reads
        client = _Client(self.target, self.max_connections, self.timeout_s, (self.t0, math.inf))
        client.recorder = self._recorder = _Recorder(self.t0)
        self._client = client
        cpu0 = _cpu_s()
        self._started.set()
        if self.rate_rps is not None:
            sent = await _send_on_schedule(
                client, self.t0, arrival_chunks(self.rate_rps, self.arrivals, self.seed), self._stop
            )
        else:
            sent = 0

            def again(now: float, status: int) -> None:
                nonlocal sent
                if not self._stop.is_set():
                    sent += 1
                    client.submit(now)

            client.on_done = again
            for _ in range(self.max_connections):
                sent += 1
                client.submit(self.t0)
            while not self._stop.is_set():
                await asyncio.sleep(0.05)
                client.expire()
        duration = loop.time() - self.t0
        await _drain(client, self.timeout_s)
        cpu, wall = _cpu_s() - cpu0, loop.time() - self.t0
        client.close()
        mode = ("open", self.arrivals) if self.rate_rps is not None else ("closed", f"{self.connections} connections")
        duration = max(duration, 1e-9)
        return RunResult(
            *mode,
            sent / duration,
            client.ok_completed_in_window / duration,
            duration,
            sent,
            client.ok,
            client.errors,
            dict(client.error_kinds),
            generator_cpu=100 * cpu / wall,
            connections=client.opened,
            **_percentiles(client),
        )


async def _call(f: Callable[[], bool]) -> bool:
    """Runs ``f`` in the load's event loop, where its client's state may be read."""
    return f()


def add_client_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--max-connections and --timeout: the client's two bounds, for every CLI that drives it."""
    p.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="open connections at most; past them a request waits in the client (its latency counts)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a request counts as failed")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.openloop", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--url", required=True, help="http://HOST:PORT/PATH to POST to")
    p.add_argument("--rate", type=float, help="requests/s (open loop); omit with --closed")
    p.add_argument("--closed", type=int, metavar="CONNECTIONS", help="closed loop instead, for comparison")
    p.add_argument("--arrivals", choices=ARRIVALS, default="poisson", help="inter-arrival distribution")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds sent before measuring")
    add_client_options(p)
    p.add_argument("--images-run", default="digits", help="post held-out PNGs of this run (loadtest.images)")
    p.add_argument("--body", action="append", default=[], help="a file to post instead (repeatable)")
    a = p.parse_args(argv)
    if (a.rate is None) == (a.closed is None):
        p.error("give exactly one of --rate (open loop) or --closed CONNECTIONS")
    if a.body:
        bodies = [Path(f).read_bytes() for f in a.body]
    else:
        from loadtest.images import load_pool

        bodies = list(load_pool(a.images_run, limit=128).images)
    target = Target.post(a.url, bodies)
    r = (
        run_closed_loop(target, a.closed, a.duration, a.warmup, a.timeout)
        if a.closed
        else run_open_loop(target, a.rate, a.duration, a.warmup, a.arrivals, a.max_connections, a.timeout)
    )
    doc = r.to_dict()
    doc.pop("hdr")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
