"""One model in one worker process: its handler, loaded by TorchServe's Python model loader, and the
dynamic batching in front of it.

The handler is driven as TorchServe's Python worker drives it (``ts.service.Service.predict``): the
batch's requests become the handler's list of ``{parameter name: value}`` dicts, the context carries
each request's id and headers (``RequestProcessor``), and each request's status, content type and
headers are read back from the context afterwards. What TorchServe does between the HTTP frontend and
that call (a socket protocol between Java and Python) is not needed: the batch is formed and handled
in the same process and event loop that read the requests.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import logging
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from serving.oip.mar import ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class Inbound:
    """One request for the handler.

    Attributes:
        parameters: ``[(name, value, content type)]``, in order (TorchServe's parameter list: ``body``
            for a raw body, one per multipart part).
        headers: the HTTP request headers (lower-case names).
        request_id: unique per request (the handler's metrics and logs carry it).
    """

    parameters: list[tuple[str, object, str]]
    headers: dict[str, str]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued: float = 0.0


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str]


def error_reply(code: int, type_: str, message: str, **extra) -> Reply:
    """A JSON error in the handler's shape ``{"code", "type", "message"}``."""
    body = json.dumps({"code": code, "type": type_, "message": message, **extra}).encode()
    return Reply(code, body, "application/json", {})


def load_service(spec: ModelSpec, gpu_id: int | None, metrics_cache):
    """Import the archive's handler and initialise it with TorchServe's own loader (``ts``).

    Every archive's entry module is called ``handler``: it is imported with the archive's directory
    first on ``sys.path`` and then dropped from ``sys.modules``, so the next archive's ``handler`` is
    its own (the loaded handler keeps its module alive).
    """
    from ts.model_loader import TsModelLoader

    sys.path.insert(0, str(spec.model_dir))
    module = spec.handler.split(":", 1)[0].removesuffix(".py").split("/")[-1]
    sys.modules.pop(module, None)
    importlib.invalidate_caches()
    try:
        return TsModelLoader().load(
            spec.name, str(spec.model_dir), spec.handler, gpu_id, spec.batch_size, None, True, metrics_cache
        )
    finally:
        sys.path.remove(str(spec.model_dir))
        sys.modules.pop(module, None)


def _serialise(value) -> tuple[bytes, str]:
    """A handler's answer for one request -> bytes, as ``ts.protocol.otf_message_handler`` encodes it."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "application/octet-stream"
    if isinstance(value, str):
        return value.encode("utf-8"), "text/plain; charset=utf-8"
    try:
        import torch

        if isinstance(value, torch.Tensor):
            buf = io.BytesIO()
            torch.save(value, buf)
            return buf.getvalue(), "application/octet-stream"
    except ImportError:  # pragma: no cover -- torch is always there with ts
        pass
    return json.dumps(value, indent=2).encode("utf-8"), "application/json"


class LoadedModel:
    """A handler ready to take batches: ``run(batch) -> one Reply per request``, never raising."""

    def __init__(self, spec: ModelSpec, service, metrics) -> None:
        self.spec = spec
        self.service = service
        self.metrics = metrics  # serving.oip.metrics.WorkerMetrics

    @property
    def handler(self):
        """The handler instance (its ``info`` and ``core`` when it is our ClassifierHandler)."""
        return getattr(self.service._entry_point, "__self__", None)

    def run(self, batch: list[Inbound]) -> list[Reply]:
        from ts.context import RequestProcessor
        from ts.utils.util import PredictionException

        ctx = self.service.context
        input_batch, processors = [], []
        for req in batch:
            model_in: dict[str, object] = {}
            props: dict[str, object] = {}
            for name, value, ctype in req.parameters:
                model_in[name] = value
                props[name] = {"content-type": ctype}
            props.update(req.headers)
            input_batch.append(model_in)
            processors.append(RequestProcessor(props))
        ctx.request_ids = {i: r.request_id for i, r in enumerate(batch)}
        ctx.request_processor = processors
        ctx.metrics.request_ids = ctx.request_ids
        ctx.cl_socket = None
        start = time.time()
        try:
            answers = self.service._entry_point(input_batch, ctx)
        except MemoryError:
            logger.exception("%s: out of memory", self.spec.name)
            return [error_reply(507, "out_of_resources", "the worker ran out of memory")] * len(batch)
        except PredictionException as e:
            return [error_reply(e.error_code, "prediction_error", e.message)] * len(batch)
        except Exception:
            logger.warning("%s: invoking the handler failed", self.spec.name, exc_info=True)
            return [error_reply(503, "prediction_failed", "the handler failed on this batch")] * len(batch)
        took_ms = (time.time() - start) * 1e3
        if not isinstance(answers, list) or len(answers) != len(batch):
            logger.warning(
                "%s: the handler returned %s for %d requests", self.spec.name, type(answers).__name__, len(batch)
            )
            return [error_reply(503, "invalid_handler_output", "the handler's answer did not match the batch")] * len(
                batch
            )
        if took_ms > self.spec.response_timeout_s * 1e3:
            logger.warning(
                "%s: a batch took %.0f ms, over responseTimeout %d s",
                self.spec.name,
                took_ms,
                self.spec.response_timeout_s,
            )
        ctx.metrics.add_time("PredictionTime", round(took_ms, 2))
        replies = []
        for i, value in enumerate(answers):
            body, default_type = _serialise(value)
            code, _phrase = ctx.get_response_status(i)
            replies.append(
                Reply(
                    code or 200,
                    body,
                    ctx.get_response_content_type(i) or default_type,
                    dict(ctx.get_response_headers(i) or {}),
                )
            )
        return replies


class Batcher:
    """Dynamic batching for one model in one event loop.

    A request waits at most ``max_batch_delay_ms`` for others to join it, up to ``batch_size``; the
    batch is then handled inline (no thread hop: a worker process has one core's worth of work to do,
    and requests that arrive meanwhile are read as soon as it returns, forming the next batch).

    Back-pressure counts a request from the moment its headers arrive (``admit``) until it is answered
    (``release``): past ``queue_size`` waiting plus one batch in the model, a new request is refused at
    once, before its body is read. (Counting only requests already in ``pending`` would admit them all:
    while the loop runs the model, bodies are read a little at a time and reach the queue one by one.)
    """

    def __init__(self, model: LoadedModel, queue_size: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.model = model
        self.batch_size = model.spec.batch_size
        self.delay = model.spec.max_batch_delay_ms / 1e3
        self.queue_size = queue_size
        self.loop = loop or asyncio.get_running_loop()
        self.pending: deque[tuple[Inbound, asyncio.Future]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._now = False
        self.admitted = 0

    def admit(self) -> bool:
        """Take a place for a request whose body is still to come; False: answer it 503 now."""
        if self.admitted >= self.queue_size + self.batch_size:
            return False
        self.admitted += 1
        return True

    def release(self) -> None:
        self.admitted -= 1

    def submit(self, request: Inbound) -> asyncio.Future | None:
        if len(self.pending) >= self.queue_size:
            return None
        request.enqueued = time.perf_counter()
        fut = self.loop.create_future()
        self.pending.append((request, fut))
        self._schedule()
        return fut

    def _schedule(self) -> None:
        if self._now or not self.pending:
            return
        if len(self.pending) >= self.batch_size or self.delay == 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._now = True
            self.loop.call_soon(self._fire)
        elif self._timer is None:
            waited = time.perf_counter() - self.pending[0][0].enqueued
            self._timer = self.loop.call_later(max(0.0, self.delay - waited), self._fire)

    def _fire(self) -> None:
        self._timer, self._now = None, False
        batch: list[tuple[Inbound, asyncio.Future]] = []
        while self.pending and len(batch) < self.batch_size:
            req, fut = self.pending.popleft()
            if not fut.done():  # a client that went away is not worth a model call
                batch.append((req, fut))
        if batch:
            started = time.perf_counter()
            self.model.metrics.queued([started - r.enqueued for r, _ in batch])
            replies = self.model.run([r for r, _ in batch])
            for (_, fut), reply in zip(batch, replies, strict=True):
                if not fut.done():
                    fut.set_result(reply)
        self._schedule()

    def drain_size(self) -> int:
        return len(self.pending)
