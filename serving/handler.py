"""The TorchServe handler: one class for every model and variant, thin over ``serving.core``.

A TorchServe batch holds several HTTP requests. Each is parsed and decoded on its own; a request that
fails gets its own 4xx status and JSON error (``context.set_response_status(code, phrase, idx)``) while
the images of the others go through the model together in one call. The archive's ``handler.py`` only
subclasses ``ClassifierHandler`` (``serving/archive_entry.py``): the code runs from the installed
project, never from a copy frozen into the .mar.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from export.runtime import VARIANTS, IntegrityError, load_variant
from serving.core import InferenceCore, InputError, Limits, StageTimes, top_k
from serving.protocol import ModelInfo, error_response, format_response, parse_request
from serving.metrics import HandlerMetrics  # noqa: I001 -- every metric is declared there

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandlerConfig:
    """The ``handler:`` section of the archive's model-config.yaml, parsed once.

    Attributes:
        variant_cpu, variant_cuda: variant to load per device type; None = the manifest's default
            (the one export's benchmarks found fastest at equal accuracy).
        threads: intra-op threads of this worker's runtime; None leaves the runtime default (all cores).
        limits: per-request limits.
    """

    variant_cpu: str | None = None
    variant_cuda: str | None = None
    threads: int | None = 1
    limits: Limits = Limits()

    @classmethod
    def from_yaml(cls, model_yaml_config: dict | None) -> "HandlerConfig":
        section = dict((model_yaml_config or {}).get("handler") or {})
        limit_keys = {"max_images", "max_pixels", "max_image_bytes", "default_topk"}
        known = {"variant_cpu", "variant_cuda", "threads", *limit_keys}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"model-config.yaml handler: unknown keys {unknown}; known: {sorted(known)}")
        for key in ("variant_cpu", "variant_cuda"):
            if section.get(key) is not None and section[key] not in VARIANTS:
                raise ValueError(f"model-config.yaml handler.{key}: {section[key]!r} is not one of {VARIANTS}")
        limits = Limits(**{k: int(section[k]) for k in limit_keys if section.get(k) is not None})
        threads = section.get("threads", 1)
        return cls(section.get("variant_cpu"), section.get("variant_cuda"),
                   None if threads is None else int(threads), limits)


def pick_device(gpu_id) -> str:
    """TorchServe hands a worker a ``gpu_id`` when the host has GPUs; use it only if CUDA works here."""
    if gpu_id is not None and torch.cuda.is_available():
        return f"cuda:{gpu_id}"
    return "cpu"


class ClassifierHandler(BaseHandler):
    """Serves any exported classifier whose manifest is in the model directory."""

    def initialize(self, context) -> None:
        # BaseHandler.initialize loads a serializedFile with torch; our model is the manifest's variant,
        # loaded (and sha256-verified) by export.runtime, so the base initializer is not called.
        props = context.system_properties
        self.context = context
        HandlerMetrics(context.metrics, context.model_name).worker_started()  # before a load that may fail
        self.config = HandlerConfig.from_yaml(getattr(context, "model_yaml_config", None))
        device = pick_device(props.get("gpu_id"))
        variant = self.config.variant_cuda if device.startswith("cuda") else self.config.variant_cpu
        try:
            runner = load_variant(props["model_dir"], variant, device=device, threads=self.config.threads)
        except IntegrityError as e:  # fail the worker loudly, naming the archive and the fix
            raise IntegrityError(f"archive of model {context.model_name!r} is corrupt: {e} -- rebuild it: "
                                 f"make archive RUN={context.model_name}") from e
        self.setup(runner, self.config.limits, context.model_name, context.metrics)
        logger.info("loaded %r: %s on %s, %s threads, limits %s", self.info.name, runner.variant,
                    runner.device, self.config.threads, self.config.limits)

    def setup(self, runner, limits: Limits, model_name: str, metrics) -> None:
        """Wire a loaded runner in (``initialize`` does this; unit tests pass a fake runner)."""
        self.core = InferenceCore(runner, limits)
        self.info = ModelInfo(name=model_name, version=str(runner.manifest.get("version", "")),
                              variant=runner.variant, device=runner.device)
        self._init_metrics(metrics)
        self.initialized = True

    def _init_metrics(self, metrics) -> None:
        self.metrics = metrics
        self.emit = HandlerMetrics(metrics, self.info.name)

    # ---------------------------------------------------------------------------------------------
    def handle(self, data: list[dict], context) -> list[str]:
        """A batch of requests -> one JSON string per request, each with its own HTTP status."""
        start = time.perf_counter()
        times = StageTimes()
        responses: list[str | None] = [None] * len(data)
        parsed: dict[int, tuple] = {}  # request index -> (Request, (n, C, H, W) pixels, topk)
        for i, params in enumerate(data):
            try:
                req = parse_request(params, self.core.contract, self.core.limits,
                                    self._content_types(context, i, params), self._headers(context, i))
                k = self.core.check_topk(req.topk)
                pixels = np.stack([self.core.to_pixels(x, req.invert, times) for x in req.items])
                parsed[i] = (req, pixels, k)
            except InputError as err:
                responses[i] = self._reject(context, i, err)
            except Exception as err:  # noqa: BLE001 -- our bug: fail this request only, loudly
                logger.exception("request %d: unexpected error while preparing its images", i)
                responses[i] = self._reply(context, i, 500, {
                    "code": 500, "type": "internal_error",
                    "message": f"the server failed on this request ({type(err).__name__}); see its log"})
        if parsed:
            order = sorted(parsed)
            logits = self.core.infer(np.concatenate([parsed[i][1] for i in order]), times)
            offset = 0
            for i in order:
                req, pixels, k = parsed[i]
                rows = logits[offset:offset + len(pixels)]
                offset += len(pixels)
                body = format_response(req, self.info, top_k(rows, k, self.core.contract.class_names))
                responses[i] = self._reply(context, i, 200, body)
        if context is not None:  # observability: how many requests shared this model call
            for i in range(len(data)):
                context.set_response_header(i, "X-Batch-Size", str(len(data)))
        self._emit_times(times, context, answered_200=len(parsed), n_requests=len(data), start=start)
        logger.debug("batch of %d handled in %.1f ms", len(data), (time.perf_counter() - start) * 1e3)
        return responses

    @staticmethod
    def _content_types(context, idx: int, params: dict) -> dict[str, str]:
        """Per-parameter content types TorchServe forwards (``{"body": "image/png"}``)."""
        out = {}
        processors = getattr(context, "request_processor", None)
        if not processors:
            return out
        for name in params:
            header = processors[idx].get_request_property(name)
            if isinstance(header, dict) and header.get("content-type"):
                out[name] = str(header["content-type"])
        return out

    @staticmethod
    def _headers(context, idx: int) -> dict[str, str]:
        """The request's HTTP headers, names lower-cased (HTTP header names are case-insensitive)."""
        processors = getattr(context, "request_processor", None)
        if not processors:
            return {}
        props = processors[idx].get_request_properties() or {}
        return {str(k).lower(): v for k, v in props.items() if isinstance(v, str)}

    @staticmethod
    def _reply(context, idx: int, code: int, body: dict) -> str:
        if context is not None:
            context.set_response_status(code, "OK" if code == 200 else body.get("type", ""), idx)
            context.set_response_content_type(idx, "application/json")
        return json.dumps(body)

    def _reject(self, context, idx: int, err: InputError) -> str:
        logger.info("request %d rejected: %s %s: %s", idx, err.code, err.type, err.message)
        self.emit.rejected(err.type, context.get_request_id(idx) if context is not None else None)
        return self._reply(context, idx, err.code, error_response(err))

    def _emit_times(self, times: StageTimes, context, answered_200: int, n_requests: int, start: float) -> None:
        """The batch's size; its stage times and each 200's latency when the model ran."""
        request_id = context.get_request_id(0) if context is not None else None
        self.emit.batch(n_requests, answered_200, start, times, request_id)
