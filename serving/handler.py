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
import traceback
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from export.registry import REGISTRY
from export.runtime import IntegrityError, load_checked_variant
from serving.core import InferenceCore, InputError, Limits, StageTimes, abstains, check_min_confidence, clip, top_k
from serving.metrics import HandlerMetrics
from serving.protocol import ModelInfo, error_response, format_response, parse_request
from training.machine import cpu_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandlerConfig:
    """The ``handler:`` section of the archive's model-config.yaml, parsed once.

    Attributes:
        variant_cpu, variant_cuda: variant to load per device type; None = the manifest's default
            (the one export's benchmarks found fastest at equal accuracy).
        threads: intra-op threads of this worker's runtime; None leaves the runtime default (all cores).
        limits: per-request limits.
        min_confidence: answers whose top probability is below it say ``"abstain": true`` (0: never);
            a request's ``min_confidence`` option overrides it.
        ood_abstain: an image the detector flags out of distribution is also answered
            ``"abstain": true`` (false: the ``ood`` flag alone says it).
    """

    variant_cpu: str | None = None
    variant_cuda: str | None = None
    threads: int | None = 1
    limits: Limits = Limits()
    min_confidence: float = 0.0
    ood_abstain: bool = True

    @classmethod
    def from_yaml(cls, model_yaml_config: dict | None) -> HandlerConfig:
        section = dict((model_yaml_config or {}).get("handler") or {})
        limit_keys = set(Limits.__dataclass_fields__)
        known = {"variant_cpu", "variant_cuda", "threads", "min_confidence", "ood_abstain", *limit_keys}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"model-config.yaml handler: unknown keys {unknown}; known: {sorted(known)}")
        for key in ("variant_cpu", "variant_cuda"):
            if section.get(key) is not None and section[key] not in REGISTRY:
                raise ValueError(f"model-config.yaml handler.{key}: {section[key]!r} is not one of {tuple(REGISTRY)}")
        limits = Limits(**{k: int(section[k]) for k in limit_keys if section.get(k) is not None})
        threads = section.get("threads", 1)
        min_confidence = check_min_confidence(float(section.get("min_confidence") or 0.0))
        ood_abstain = section.get("ood_abstain", True)
        if not isinstance(ood_abstain, bool):
            raise ValueError(f"model-config.yaml handler.ood_abstain must be true or false, got {ood_abstain!r}")
        return cls(
            section.get("variant_cpu"),
            section.get("variant_cuda"),
            None if threads is None else int(threads),
            limits,
            min_confidence,
            ood_abstain,
        )


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
        emit = HandlerMetrics(context.metrics, context.model_name)
        emit.worker_started()  # before a load that may fail
        self.config = HandlerConfig.from_yaml(getattr(context, "model_yaml_config", None))
        device = pick_device(props.get("gpu_id"))
        variant = self.config.variant_cuda if device.startswith("cuda") else self.config.variant_cpu

        def fell_back(name: str, on: str, numbers: dict, why: str) -> None:  # one line per failed variant
            logger.warning("reference check failed: %s on %s (%s): %s; falling back", name, on, cpu_name(), why)
            emit.fallback(name)

        try:  # the variant proves itself on the reference batch on this device before taking traffic
            runner = load_checked_variant(
                props["model_dir"], variant, device=device, threads=self.config.threads, on_failure=fell_back
            )
        except IntegrityError as e:  # fail the worker loudly, naming the archive and the fix
            raise IntegrityError(
                f"archive of model {context.model_name!r} is corrupt: {e} -- rebuild it: "
                f"make archive RUN={context.model_name}"
            ) from e
        self.setup(
            runner,
            self.config.limits,
            context.model_name,
            context.metrics,
            self.config.min_confidence,
            self.config.ood_abstain,
        )
        ood_entry = runner.manifest.get("ood")
        if ood_entry:
            emit.ood_baseline(ood_entry["heldout"]["ood_share"])
        else:
            logger.warning(
                "%r was exported without an out-of-distribution detector: its answers carry no "
                "ood flag (re-export and re-archive it for one)",
                context.model_name,
            )
        logger.info(
            "loaded %r: %s on %s, %s threads, limits %s, reference check %s",
            self.info.name,
            runner.variant,
            runner.device,
            self.config.threads,
            self.config.limits,
            runner.reference_check,
        )

    def setup(
        self, runner, limits: Limits, model_name: str, metrics, min_confidence: float = 0.0, ood_abstain: bool = True
    ) -> None:
        """Wire a loaded runner in (``initialize`` does this; unit tests pass a fake runner)."""
        self.core = InferenceCore(runner, limits, min_confidence)
        self.ood_abstain = ood_abstain
        self.info = ModelInfo(
            name=model_name,
            version=str(runner.manifest.get("version", "")),
            variant=runner.variant,
            device=runner.device,
        )
        self._init_metrics(metrics)
        self.initialized = True

    def _init_metrics(self, metrics) -> None:
        self.metrics = metrics
        self.emit = HandlerMetrics(metrics, self.info.name)

    # ---------------------------------------------------------------------------------------------
    def handle(self, data: list[dict], context) -> list[str]:
        """A batch of requests -> one JSON string per request, each with its own HTTP status.

        Whatever the requests hold, this returns one small answer per request and never raises: a
        handler exception or an answer over TorchServe's ``max_response_size`` would make the
        frontend fail the batch or kill the worker, taking every other client's request with it.
        """
        start = time.perf_counter()
        times = StageTimes()
        responses: list[str | None] = [None] * len(data)
        answered = 0  # requests answered 200
        try:
            plans = self._open_requests(data, context, responses)
            parsed = self._decode_within_budget(plans, context, responses, times)
            if parsed:
                answered = self._run_model(parsed, context, responses, times)
        except Exception as err:  # noqa: BLE001 -- our bug: answer every request still open, keep the worker
            self._log_unexpected("batch", err)
            for i, r in enumerate(responses):
                if r is None:
                    responses[i] = self._internal_error(context, i, "the server failed on this batch", err)
        if context is not None:  # observability: how many requests shared this model call
            for i in range(len(data)):
                context.set_response_header(i, "X-Batch-Size", str(len(data)))
        self._emit_times(times, context, answered_200=answered, n_requests=len(data), start=start)
        logger.debug("batch of %d handled in %.1f ms", len(data), (time.perf_counter() - start) * 1e3)
        return cast("list[str]", responses)  # each answered by its stage, or above when the batch failed

    def _open_requests(self, data: list[dict], context, responses: list) -> dict[int, tuple]:
        """Parse every request and read its images' headers (no pixel decoded yet).

        Returns {request index: (Request, opened images, topk, pixel cost)}; refused requests get
        their answer in ``responses``.
        """

        def plan(i: int, params: dict) -> tuple:
            req = parse_request(
                params,
                self.core.contract,
                self.core.limits,
                self._content_types(context, i, params),
                self._headers(context, i),
            )
            k = self.core.check_topk(req.topk)
            opened, cost = self.core.open_request(req.items)
            return req, opened, k, cost

        plans = {i: self._guarded(context, i, responses, plan, i, params) for i, params in enumerate(data)}
        return {i: p for i, p in plans.items() if p is not None}

    def _decode_within_budget(self, plans: dict, context, responses: list, times: StageTimes) -> dict[int, tuple]:
        """Decode the requests cheapest first while the batch's pixel budget lasts.

        A request that no longer fits is answered 503 (retry later): with every request under
        ``max_request_pixels`` and the batch under ``max_batch_pixels``, one model call costs a
        bounded time whatever the clients send, and a flood of the costliest requests cannot crowd
        out the small ones batched with them. Returns {index: (Request, (n, C, H, W) pixels, topk)}.
        """
        parsed, spent = {}, 0
        for i in sorted(plans, key=lambda j: plans[j][3]):
            req, opened, k, cost = plans[i]
            if spent and spent + cost > self.core.limits.max_batch_pixels:
                responses[i] = self._reject(
                    context,
                    i,
                    InputError(
                        503,
                        "batch_budget_spent",
                        f"this model call already decodes {spent} pixels and this request needs {cost} more, "
                        f"over the batch limit of {self.core.limits.max_batch_pixels}; retry in a moment",
                    ),
                )
                continue
            spent += cost
            pixels = self._guarded(context, i, responses, self._finish, req, opened, times)
            if pixels is not None:
                parsed[i] = (req, pixels, k)
        return parsed

    def _finish(self, req, opened: list, times: StageTimes) -> np.ndarray:
        """One request's opened images decoded and preprocessed: (n, C, H, W)."""
        return np.stack([self.core.finish(o, req.invert, times) for o in opened])

    def _guarded(self, context, i: int, responses: list, step, *args):
        """``step(*args)`` for request ``i``: an InputError becomes that request's 4xx answer, any
        other exception (our bug) a 500 for that request only. Returns the step's value, or None
        when the request has been answered."""
        try:
            return step(*args)
        except InputError as err:
            responses[i] = self._reject(context, i, err)
        except Exception as err:  # noqa: BLE001 -- our bug: fail this request only, loudly
            self._log_unexpected(f"request {i}", err)
            responses[i] = self._internal_error(context, i, "the server failed on this request", err)
        return None

    def _run_model(self, parsed: dict, context, responses: list, times: StageTimes) -> int:
        """One model call for every admitted request; a failure answers 500 for them, the worker stays.
        Returns how many were answered 200."""
        order = sorted(parsed)
        try:
            logits, scores = self.core.predict(np.concatenate([parsed[i][1] for i in order]), times)
        except Exception as err:  # noqa: BLE001 -- the runtime failed: this batch fails, not the worker
            self._log_unexpected("model call", err)
            for i in order:
                responses[i] = self._internal_error(context, i, "the model failed on this batch", err)
            return 0
        flags = self.core.ood_flags(scores)  # None: no detector
        offset = 0
        for i in order:
            req, pixels, k = parsed[i]
            rows = slice(offset, offset + len(pixels))
            offset += len(pixels)
            best = top_k(logits[rows], k, self.core.contract.class_names, self.core.temperature)
            threshold = self.core.min_confidence if req.min_confidence is None else req.min_confidence
            abstain = abstains(best, threshold)
            ood = None if flags is None else flags[rows]
            if ood is not None and self.ood_abstain:
                abstain = [a or o for a, o in zip(abstain, ood, strict=True)]
            body = format_response(req, self.info, best, abstain, ood, None if scores is None else scores[rows])
            responses[i] = self._reply(context, i, 200, body)
        self.emit.answered_images(
            offset, None if flags is None else sum(flags), context.get_request_id(0) if context is not None else None
        )
        return len(order)

    @staticmethod
    def _content_types(context, idx: int, params: dict) -> dict[str, str]:
        """Per-parameter content types TorchServe forwards (``{"body": "image/png"}``)."""
        out: dict[str, str] = {}
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

    def _reply(self, context, idx: int, code: int, body: dict) -> str:
        text = json.dumps(body)
        if len(text) > self.core.limits.max_response_bytes:  # bounded by the limits; a last guard
            code, body = (
                413,
                {
                    "code": 413,
                    "type": "response_too_large",
                    "message": f"the answer would be {len(text)} bytes, over the limit of "
                    f"{self.core.limits.max_response_bytes}; ask for fewer images "
                    f"or a smaller topk",
                },
            )
            text = json.dumps(body)
        if context is not None:
            context.set_response_status(code, "OK" if code == 200 else body.get("type", ""), idx)
            context.set_response_content_type(idx, "application/json")
        return text

    def _reject(self, context, idx: int, err: InputError) -> str:
        logger.info("request %d rejected: %s %s: %s", idx, err.code, err.type, err.message)
        self.emit.rejected(err.type, context.get_request_id(idx) if context is not None else None)
        return self._reply(context, idx, err.code, error_response(err))

    def _internal_error(self, context, idx: int, what: str, err: Exception) -> str:
        return self._reply(
            context,
            idx,
            500,
            {"code": 500, "type": "internal_error", "message": f"{what} ({type(err).__name__}); see its log"},
        )

    @staticmethod
    def _log_unexpected(where: str, err: Exception) -> None:
        # The traceback's code lines, and the message cut short: it may quote client data.
        logger.error(
            "%s: unexpected %s: %s\n%s",
            where,
            type(err).__name__,
            clip(str(err)),
            "".join(traceback.format_tb(err.__traceback__)),
        )

    def _emit_times(self, times: StageTimes, context, answered_200: int, n_requests: int, start: float) -> None:
        """The batch's size; its stage times and each 200's latency when the model ran."""
        request_id = context.get_request_id(0) if context is not None else None
        self.emit.batch(n_requests, answered_200, start, times, request_id)
