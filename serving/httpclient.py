"""The one HTTP client of this repository: serving's CLI, the smoke check, load tests and tests use it.

Standard library only (``http.client``), so it also runs where nothing is installed but Python. Every
status is an answer (a 413 or a 503 is something to read, not an exception); only "no answer at
all" raises, as ``NoAnswer``. ``Session`` keeps one connection alive across requests, as curl,
locust and tritonclient do; ``request`` is one request on a connection of its own.

Why not urllib: it sends ``Connection: close``, and a server that refuses a large body from its
headers (413) closes while the body is still arriving; the client then sees a reset instead of the
answer. A kept-alive connection lets the server drop the rest of the body and the client read it.
"""

from __future__ import annotations

import http.client
import io
import json
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self


class NoAnswer(OSError):
    """The server did not answer: nothing listening, the connection reset, or the timeout passed."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str]  # names lower-cased

    def json(self) -> Any:
        """The body as JSON; None when it is empty or not JSON (a proxy's HTML page, a plain 500)."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


class Session:
    """Requests to one server over one kept-alive connection.

    A connection the server closed while idle (its keep-alive timeout) is replaced once, for a
    request that had not been answered; any other failure is ``NoAnswer`` and the next request
    opens a fresh connection.
    """

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{base_url!r}: expected http://HOST[:PORT]")
        self.base_url = base_url.rstrip("/")
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = dict(headers or {})
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """``path`` is below the base URL (``/predictions/digits``); returns every status."""
        target = self.prefix + path
        sent = {**self.headers, **(headers or {})}
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection(timeout)
            try:
                conn.request(method, target, body=body, headers=sent)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if reused and attempt == 1:  # closed while idle: the request never reached a handler
                    continue
                raise NoAnswer(f"{method} {self.base_url}{path}: {e or type(e).__name__}") from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise NoAnswer(f"{method} {self.base_url}{path}: {e or type(e).__name__}") from None
            if resp.will_close:
                self.close()
            return Response(resp.status, data, {k.lower(): v for k, v in resp.getheaders()})
        raise AssertionError("unreachable")  # pragma: no cover -- the loop returns or raises

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        elif timeout is not None and self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> Response:
    """One request on a connection of its own (closed after the answer)."""
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    with Session(f"{parts.scheme}://{parts.netloc}", timeout=timeout) as s:
        return s.request(method, path, body, headers)


def wait_until_ok(url: str, timeout: float, alive: Callable[[], bool] = lambda: True, interval: float = 0.1) -> bool:
    """Poll ``GET url`` until it answers 200 (True), ``timeout`` seconds pass or ``alive()`` turns
    false (False): a server coming up, whose process may also die while it does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            if request("GET", url, timeout=min(2.0, timeout)).status == 200:
                return True
        except NoAnswer:
            pass
        time.sleep(interval)
    return False


def multipart(files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """{field: (filename, bytes, content type)} -> (body, Content-Type header) for multipart/form-data."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for field, (filename, data, ctype) in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"
