"""A Java-free runtime for the same ``.mar`` archives TorchServe serves.

It opens each archive, imports its handler with TorchServe's own Python model loader (``ts``), and
serves it over HTTP/1.1 (uvicorn with httptools and uvloop) and gRPC (grpcio), speaking
``/predictions/<name>`` as TorchServe does, KServe v1 ``:predict`` and the Open Inference Protocol
(v2) on both transports. Each worker process serves every model, batching requests in its event loop
and calling the handler inline: no second hop between a frontend and the worker.

Modules: ``mar`` (archive -> ModelSpec), ``batching`` (per-model dynamic batching and the handler
drive), ``v2`` (Open Inference Protocol documents and the binary tensor extension), ``http`` (routes
and the bounded HTTP/1.1 protocol), ``grpc_service``, ``metrics`` (Prometheus, same names as
TorchServe), ``worker`` (one process) and ``supervisor`` (sockets, worker processes, drain).
"""
