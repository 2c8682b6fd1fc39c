"""HTTP/1.1 of the Open Inference Protocol runtime: the routes (an ASGI app for uvicorn) and the
bounds on every connection (a subclass of uvicorn's httptools protocol).

uvicorn answers pipelined requests in order and honours ``Connection: close``; what it does not bound
is added by ``BoundedProtocol``: a connection cap (past it, a new connection gets a 503 JSON and is
closed), a deadline for reading each request (headers and body; an idle or trickling client is
closed, with a 408 JSON when nothing is in flight), a cap on the request line plus headers (431), a
Content-Length over the body limit refused before the body is read (413), and a JSON 400 for bytes
that are not HTTP. Routes answer JSON for every error, on every path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import urllib.parse
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.core import InputError, clip
from serving.oip import v2
from serving.oip.batching import Inbound, Reply, error_reply

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection bounds (the model's own limits are the handler's ``Limits``).

    Attributes:
        max_request_bytes: body size; a larger Content-Length is refused before the body is read
            (TorchServe's ``max_request_size``).
        max_header_bytes: request line plus headers.
        read_timeout_s: time to read one request, headers and body, from its first byte; also the
            time a new connection may stay silent.
        keepalive_s: an idle keep-alive connection is closed after this.
        max_connections: open connections per worker process; past it new ones get 503 and are closed.
    """

    max_request_bytes: int = 16 * 2**20
    max_header_bytes: int = 64 * 1024
    read_timeout_s: float = 30.0
    keepalive_s: float = 75.0
    max_connections: int = 2048


def _raw_response(code: int, type_: str, message: str) -> bytes:
    body = json.dumps({"code": code, "type": type_, "message": message}).encode()
    phrase = {
        400: "Bad Request",
        408: "Request Timeout",
        413: "Payload Too Large",
        431: "Request Header Fields Too Large",
        503: "Service Unavailable",
    }[code]
    return (
        f"HTTP/1.1 {code} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n"
    ).encode() + body


class _Refuse(Exception):
    def __init__(self, code: int, type_: str, message: str, body_bytes: int = 0) -> None:
        super().__init__(message)
        self.answer = _raw_response(code, type_, message)
        self.body_bytes = body_bytes  # a body still on its way, read and dropped before closing


class BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds described in the module docstring."""

    limits = HttpLimits()  # set per server by ``protocol_for``

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_bytes = 0
        self._discard = 0
        self._read_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            transport.write(
                _raw_response(
                    503,
                    "too_many_connections",
                    f"this worker has {self.limits.max_connections} open connections, its limit; retry in a moment",
                )
            )
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.limits.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._discard:  # the refusal was sent already
            self.transport.close()
            return
        if self.cycle is None or self.cycle.response_complete:  # nothing of ours in flight: say why
            self.transport.write(
                _raw_response(
                    408, "request_timeout", f"the request was not received within {self.limits.read_timeout_s:g} s"
                )
            )
        self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discard:  # the rest of a refused body: dropped, then the connection closes
            self._discard -= len(data)
            if self._discard <= 0:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except _Refuse as r:
            self._refuse(r.answer, r.body_bytes, data)
        except httptools.HttpParserUpgrade:
            self._refuse(_raw_response(400, "bad_request", "protocol upgrades are not supported"))
        except httptools.HttpParserError as e:  # a _Refuse raised in a callback arrives wrapped in one
            cause = e.__context__ if isinstance(e.__context__, _Refuse) else None
            if cause is not None:
                self._refuse(cause.answer, cause.body_bytes, data)
            else:
                self._refuse(_raw_response(400, "bad_request", f"not a valid HTTP/1.1 request ({clip(str(e))})"))

    def _refuse(self, answer: bytes, body_bytes: int = 0, data: bytes = b"") -> None:
        """Answer and close. With a body still arriving, close only once it has (within the read
        timeout): closing a socket that is still receiving makes the kernel reset it, and a client
        busy sending its body would lose the answer."""
        self._disarm()
        if self.transport.is_closing():
            return
        self.transport.write(answer)
        end = data.find(b"\r\n\r\n")
        self._discard = body_bytes - (len(data) - end - 4 if end >= 0 else 0)
        if self._discard > 0:
            self._arm()  # a client that stops sending is still closed after the read timeout
        else:
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > self.limits.max_request_bytes:
            raise _Refuse(
                413,
                "request_too_large",
                f"the body is {int(value)} bytes, over the limit of {self.limits.max_request_bytes}",
                body_bytes=int(value),
            )
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            raise _Refuse(
                431, "headers_too_large", f"the request line and headers exceed {self.limits.max_header_bytes} bytes"
            )

    def on_body(self, body: bytes) -> None:
        if self.cycle is not None and len(self.cycle.body) + len(body) > self.limits.max_request_bytes:
            raise _Refuse(413, "request_too_large", f"the body exceeds {self.limits.max_request_bytes} bytes")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def protocol_for(limits: HttpLimits) -> type[BoundedProtocol]:
    return type("BoundedProtocolWithLimits", (BoundedProtocol,), {"limits": limits})


# --------------------------------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------------------------------
def _json_reply(code: int, doc: dict) -> Reply:
    return Reply(code, json.dumps(doc).encode(), "application/json", {})


class Disconnected(Exception):
    """The client went away before its body arrived."""


async def read_body(receive, limit: int) -> bytes:
    chunks, total = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise Disconnected
        chunk = msg.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise InputError(413, "request_too_large", f"the body exceeds {limit} bytes")
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


def parameters(body: bytes, content_type: str) -> list[tuple[str, object, str]]:
    """A body -> TorchServe's parameter list: one per multipart part, the fields of a URL-encoded
    form, else the whole body as ``body``."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        return _multipart(body, content_type)
    if kind == "application/x-www-form-urlencoded":
        return [(k, v.encode(), "text/plain") for k, v in urllib.parse.parse_qsl(body.decode("latin-1"))] or [
            ("body", body, content_type)
        ]
    return [("body", body, content_type)]


def _multipart(body: bytes, content_type: str) -> list[tuple[str, object, str]]:
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise InputError(400, "bad_multipart", "multipart/form-data without a boundary")
    parts: list[tuple[str, object, str]] = []
    state: dict = {}

    def on_part_begin():
        state.update(headers={}, data=[], field=b"", value=b"")

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"].decode("latin-1")
        state["field"], state["value"] = b"", b""

    def on_part_data(data, start, end):
        state["data"].append(data[start:end])

    def on_part_end():
        _, disp = parse_options_header(state["headers"].get("content-disposition", ""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        ctype = state["headers"].get("content-type", "text/plain")
        parts.append((name, b"".join(state["data"]), ctype))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except Exception as e:  # noqa: BLE001 -- python-multipart raises its own and ValueErrors on bad bytes
        raise InputError(400, "bad_multipart", f"the multipart body is malformed ({clip(str(e))})") from None
    return parts


class App:
    """The ASGI application of one worker: inference routes on the HTTP port, /metrics on its own."""

    def __init__(self, runtime) -> None:
        self.rt = runtime  # serving.oip.worker.Runtime

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # uvicorn runs with lifespan off and no websockets
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if scope["server"] and scope["server"][1] == self.rt.metrics_port:
                reply = self._metrics(scope)
            else:
                reply = await self._route(scope, receive, headers)
        except InputError as e:
            reply = error_reply(e.code, e.type, e.message)
        except Disconnected:
            return
        out = [(b"content-type", reply.content_type.encode()), (b"content-length", str(len(reply.body)).encode())]
        out += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in reply.headers.items()]
        if reply.status in (408, 413):  # the rest of the body may still be on its way
            out.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else reply.body})
        self.rt.metrics.response(reply.status)

    def _metrics(self, scope) -> Reply:
        if scope["path"] != "/metrics":
            return error_reply(404, "not_found", f"{clip(scope['path'])}: this port serves /metrics only")
        from serving.oip.metrics import render

        return Reply(200, render().encode(), "text/plain; version=0.0.4; charset=utf-8", {})

    def _authorised(self, headers: dict[str, str]) -> bool:
        if self.rt.token is None:
            return True
        given = headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.rt.token}".encode())

    async def _route(self, scope, receive, headers: dict[str, str]) -> Reply:
        method, path = scope["method"], scope["path"]
        parts = [p for p in path.split("/") if p]
        get = method in ("GET", "HEAD")
        # health: no token (probes carry none), as TorchServe's /ping
        if parts == ["ping"] and get:
            return _json_reply(200 if self.rt.ready else 503, {"status": "Healthy" if self.rt.ready else "Unhealthy"})
        if parts[:2] == ["v2", "health"] and len(parts) == 3 and get:
            if parts[2] == "live":
                return _json_reply(200, {"live": True})
            if parts[2] == "ready":
                return _json_reply(200 if self.rt.ready else 503, {"ready": self.rt.ready})
        if not self._authorised(headers):
            return error_reply(
                401,
                "unauthorized",
                'this server needs "Authorization: Bearer <key>": the inference key is in the server\'s key_file.json',
            )
        if parts == ["v2"] and get:
            return _json_reply(200, v2.server_metadata(self.rt.version))
        if parts[:1] == ["predictions"] and len(parts) in (2, 3):
            return await self._infer(method, parts[1], scope, receive, headers, "predictions")
        if parts[:2] == ["v1", "models"] and len(parts) == 3:
            name, _, verb = parts[2].partition(":")
            if verb == "predict":
                return await self._infer(method, name, scope, receive, headers, "v1")
            if not verb and get:
                model = self._model(name)
                return _json_reply(200, {"name": name, "ready": model is not None})
        if parts[:2] == ["v2", "models"] and len(parts) >= 3:
            name, rest = parts[2], parts[3:]
            if rest[:1] == ["versions"] and len(rest) >= 2:
                rest = rest[2:]
            if rest == ["infer"]:
                return await self._infer(method, name, scope, receive, headers, "v2")
            if rest in ([], ["ready"]) and get:
                model = self._model(name)
                if not rest:
                    return _json_reply(200, v2.model_metadata(name, model.spec.version, model.handler))
                return _json_reply(200, {"name": name, "ready": True})
        return self._not_found(method, path)

    def _model(self, name: str):
        model = self.rt.models.get(name)
        if model is None:
            raise InputError(
                404,
                "model_not_found",
                f"model {clip(name)} is not served here; served: {', '.join(sorted(self.rt.models))}",
            )
        return model[0]

    @staticmethod
    def _not_found(method: str, path: str) -> Reply:
        return error_reply(
            404,
            "not_found",
            f"{method} {clip(path)} is not a route of this server; see "
            f"docs/serving.md for /predictions/<model> and /v2",
        )

    async def _infer(self, method: str, name: str, scope, receive, headers: dict[str, str], route: str) -> Reply:
        if method != "POST":
            return error_reply(405, "method_not_allowed", f"{method} {clip(scope['path'])}: use POST")
        entry = self.rt.models.get(name)
        if entry is None:
            self._model(name)  # raises the 404
        model, batcher = entry
        if not batcher.admit():
            # Refused before any work; the body is still read (and dropped): closing a socket with unread
            # bytes makes the kernel send a reset, and the client would lose this answer.
            await read_body(receive, self.rt.http_limits.max_request_bytes)
            return self.queue_full(name, batcher)
        try:
            return await self._admitted(name, model, batcher, scope, receive, headers, route)
        finally:
            batcher.release()

    async def _admitted(self, name: str, model, batcher, scope, receive, headers: dict[str, str], route: str) -> Reply:
        started = time.perf_counter()
        body = await read_body(receive, self.rt.http_limits.max_request_bytes)
        ctype = headers.get("content-type", "")
        chosen, binary = None, False
        params: list[tuple[str, object, str]]
        if route == "v2":
            if v2.HEADER_LENGTH in headers:  # the binary tensor extension; its errors are ours to answer
                try:
                    doc = v2.parse_binary_request(body, headers[v2.HEADER_LENGTH])
                except InputError as e:
                    return self._v2_reply(error_reply(e.code, e.type, e.message), None, False)
            else:
                try:
                    doc = json.loads(body)
                except (ValueError, RecursionError):  # not JSON: the handler says so, in its own words
                    doc = None
            chosen, binary = v2.requested_outputs(doc)
            params = [("body", doc if doc is not None else body, "application/json")]
        else:
            params = parameters(body, ctype)
        request = Inbound(params, headers)
        reply = await self.submit(name, model, batcher, request)
        self.rt.metrics.inference(
            name,
            model.spec.version,
            time.perf_counter() - started,
            request.enqueued and (time.perf_counter() - request.enqueued),
        )
        if route == "v2":
            reply = self._v2_reply(reply, chosen, binary)
        return Reply(
            reply.status, reply.body, reply.content_type, {**reply.headers, "x-request-id": request.request_id}
        )

    async def submit(self, name: str, model, batcher, request: Inbound) -> Reply:
        fut = batcher.submit(request)
        return self.queue_full(name, batcher) if fut is None else await fut

    @staticmethod
    def queue_full(name: str, batcher) -> Reply:
        return error_reply(
            503,
            "queue_full",
            f"model {clip(name)} has {batcher.queue_size} requests waiting "
            f"in this worker, its queue limit; retry in a moment",
        )

    @staticmethod
    def _v2_reply(reply: Reply, chosen, binary: bool) -> Reply:
        if reply.status != 200:
            return Reply(reply.status, v2.with_error_key(reply.body), "application/json", reply.headers)
        if chosen is None and not binary:
            return reply
        try:
            body, header_length = v2.shape_answer(json.loads(reply.body), chosen, binary)
        except InputError as e:
            return Reply(e.code, v2.with_error_key(json.dumps(e.to_dict()).encode()), "application/json", {})
        if header_length is None:
            return Reply(200, body, "application/json", reply.headers)
        return Reply(
            200,
            body,
            "application/octet-stream",
            {**reply.headers, "Inference-Header-Content-Length": str(header_length)},
        )
