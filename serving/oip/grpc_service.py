"""``inference.GRPCInferenceService`` (the Open Inference Protocol over gRPC) on grpcio's asyncio server.

A ModelInfer request becomes the same v2 document an HTTP client would send (raw tensor bytes in
``raw_input_contents`` or typed ``contents``), goes through the same batcher and handler, and the
handler's v2 answer comes back as typed output tensors with their bytes in ``raw_output_contents``.
The messages are the ones ``tritonclient`` ships (generated from KServe's / Triton's proto).
"""

from __future__ import annotations

import json
import logging

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from serving.core import InputError, clip
from serving.oip import v2
from serving.oip.batching import Inbound

logger = logging.getLogger(__name__)

STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _param(p: pb.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def request_document(request: pb.ModelInferRequest) -> dict:
    """A ModelInferRequest -> the v2 JSON document the handler parses."""
    inputs = []
    for i, t in enumerate(request.inputs):
        tensor = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if i < len(request.raw_input_contents):
            tensor["data"] = v2.tensor_from_bytes(t.datatype, request.raw_input_contents[i], f"inputs[{i}]")
        elif t.datatype in CONTENTS:
            tensor["data"] = list(getattr(t.contents, CONTENTS[t.datatype]))
        else:
            raise InputError(400, "bad_request", f"inputs[{i}]: unknown datatype {clip(t.datatype)}")
        inputs.append(tensor)
    doc = {"inputs": inputs, "parameters": {k: _param(v) for k, v in request.parameters.items()}}
    if request.id:
        doc["id"] = request.id
    return doc


def response_message(answer: dict, wanted: list[str]) -> pb.ModelInferResponse:
    outputs = answer.get("outputs", [])
    if wanted:
        unknown = sorted(set(wanted) - {o["name"] for o in outputs})
        if unknown:
            raise InputError(
                400, "bad_request", f"unknown output(s) {clip(unknown)}; this model has {[o['name'] for o in outputs]}"
            )
        outputs = [o for o in outputs if o["name"] in wanted]
    msg = pb.ModelInferResponse(
        model_name=answer.get("model_name", ""), model_version=answer.get("model_version", ""), id=answer.get("id", "")
    )
    for o in outputs:
        msg.outputs.add(name=o["name"], datatype=o["datatype"], shape=o["shape"])
        msg.raw_output_contents.append(v2.tensor_to_bytes(o["datatype"], o["data"]))
    for k, value in (answer.get("parameters") or {}).items():
        msg.parameters[k].string_param = str(value)
    return msg


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The servicer of one worker; unimplemented methods answer UNIMPLEMENTED (the base class)."""

    def __init__(self, runtime, app) -> None:
        self.rt = runtime  # serving.oip.worker.Runtime
        self.app = app  # serving.oip.http.App: its submit() is the one way into a batcher

    async def _check(self, context) -> None:
        if self.rt.token is not None:
            given = dict(context.invocation_metadata()).get("authorization", "")
            if given != f"Bearer {self.rt.token}":
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this server needs metadata authorization: Bearer <key> (key_file.json)",
                )

    async def ServerLive(self, request, context):  # noqa: N802 -- the proto's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.rt.ready)

    async def ServerMetadata(self, request, context):  # noqa: N802
        await self._check(context)
        meta = v2.server_metadata(self.rt.version)
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def _model(self, name: str, context):
        entry = self.rt.models.get(name)
        if entry is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {clip(name)} is not served here; served: {', '.join(sorted(self.rt.models))}",
            )
        return entry

    async def ModelReady(self, request, context):  # noqa: N802
        await self._check(context)
        return pb.ModelReadyResponse(ready=request.name in self.rt.models)

    async def ModelMetadata(self, request, context):  # noqa: N802
        await self._check(context)
        model, _ = await self._model(request.name, context)
        meta = v2.model_metadata(request.name, model.spec.version, model.handler)
        msg = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for t in meta["inputs"]:
            msg.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        for t in meta["outputs"]:
            msg.outputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return msg

    async def ModelInfer(self, request, context):  # noqa: N802
        await self._check(context)
        model, batcher = await self._model(request.model_name, context)
        try:
            doc = request_document(request)
        except InputError as e:
            await context.abort(STATUS.get(e.code, grpc.StatusCode.INVALID_ARGUMENT), e.message)
        headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        if not batcher.admit():
            reply = self.app.queue_full(request.model_name, batcher)
        else:
            try:
                reply = await self.app.submit(
                    request.model_name, model, batcher, Inbound([("body", doc, "application/json")], headers)
                )
            finally:
                batcher.release()
        if reply.status != 200:
            try:
                message = json.loads(reply.body).get("message", "")
            except ValueError:
                message = reply.body.decode("utf-8", "replace")[:400]
            await context.abort(STATUS.get(reply.status, grpc.StatusCode.INTERNAL), message)
        try:
            return response_message(json.loads(reply.body), [o.name for o in request.outputs])
        except InputError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)


def add_to(server: grpc.aio.Server, runtime, app) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(runtime, app), server)
