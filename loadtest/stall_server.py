"""A tiny HTTP/1.1 server that answers at once except for a stall of ``stall_s`` every ``period_s``
(a garbage-collection pause, a blocked worker): the yardstick that shows whether a load generator
reports a stall (open loop) or hides it (closed loop). Used by the unit tests and ``make
capacity-demo``; runs in a background thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Self

_REPLY = b'{"ok": true}'
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(_REPLY)).encode()
    + b"\r\n\r\n"
    + _REPLY
)


class StallServer:
    """``with StallServer(stall_s=0.2, period_s=1.0) as s: ... s.url``; every request arriving in
    ``[k*period_s, k*period_s + stall_s)`` after start is answered at the end of that interval."""

    def __init__(self, stall_s: float = 0.2, period_s: float = 1.0, host: str = "127.0.0.1") -> None:
        if not 0 <= stall_s < period_s:
            raise ValueError(f"stall_s must be in [0, period_s), got {stall_s} / {period_s}")
        self.stall_s, self.period_s, self.host = stall_s, period_s, host
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def _delay(self, now: float) -> float:
        phase = (now - self._t0) % self.period_s
        return self.stall_s - phase if phase < self.stall_s else 0.0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                delay = self._delay(time.monotonic())
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(_RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, self.host, 0, backlog=1024))
        self.port = server.sockets[0].getsockname()[1]
        self._t0 = time.monotonic()
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="stall-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("stall server did not start within 10 s")
        return self

    def __exit__(self, *exc) -> None:
        assert self._loop is not None and self._thread is not None  # set by __enter__
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="serve until killed; prints the URL on the first line")
    p.add_argument("--stall", type=float, default=0.2, help="seconds of stall per period")
    p.add_argument("--period", type=float, default=1.0, help="seconds between stalls")
    a = p.parse_args(argv)
    with StallServer(a.stall, a.period) as s:
        print(s.url, flush=True)
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
