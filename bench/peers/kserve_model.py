"""The digits run on KServe's Python ``ModelServer``: a ``kserve.Model`` whose ``predict`` answers v2
(HTTP JSON, the binary tensor extension, gRPC) and v1 (``{"instances": [{"b64": ...}]}``) requests
through ``peer_core`` (``serving.core``, the code our handler runs). KServe's Python server has no
request batching, so each request is one model call.

    python kserve_model.py --model_name digits --http_port 8080 --grpc_port 8081 --workers 1
"""

from __future__ import annotations

import argparse
import uuid

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.errors import InvalidInput

from peer_core import answer, load_core, to_items
from serving.core import InputError
from serving.oip.v2 import NUMPY


class DigitsModel(Model):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.core = self.info = None

    def load(self) -> bool:
        self.core, self.info = load_core()
        self.ready = True
        return self.ready

    # With --workers > 1 KServe spawns each HTTP worker with a pickled copy of the model. An ONNX
    # Runtime session does not pickle, so each worker loads the run on its first request. (A worker
    # that has not answered the parent's liveness ping within 5 s of its start is killed and
    # respawned: on 2 busy cores the spawn's imports alone took longer, `import kserve` 7.7 s, and
    # workers were respawned forever; bench_oip_peers.py runs --workers 1 for that reason.)
    def __getstate__(self) -> dict:
        return {**self.__dict__, "core": None, "info": None}

    def predict(self, payload, headers=None, response_headers=None):
        if self.core is None:
            self.load()
        try:
            if isinstance(payload, InferRequest):
                tensor = payload.inputs[0]
                items = to_items(tensor.datatype, tensor.shape, tensor.as_numpy().ravel().tolist())
                outputs = []
                for o in answer(self.core, self.info, items):
                    out = InferOutput(o["name"], o["shape"], o["datatype"])
                    data = np.array(o["data"], dtype=NUMPY.get(o["datatype"], np.object_))  # BYTES: objects
                    # gRPC answers carry raw tensor bytes (tritonclient reads only those)
                    out.set_data_from_numpy(data.reshape(o["shape"]), binary_data=payload.from_grpc)
                    outputs.append(out)
                return InferResponse(payload.id or str(uuid.uuid4()), self.name, outputs, from_grpc=payload.from_grpc)
            instances = payload["instances"]  # v1
            items = to_items("BYTES", [len(instances)], [x["b64"] if isinstance(x, dict) else x for x in instances])
            outputs = answer(self.core, self.info, items)
            return {"predictions": [{o["name"]: np.reshape(o["data"], o["shape"])[i].tolist() for o in outputs}
                                    for i in range(len(items))]}
        except InputError as e:
            raise InvalidInput(e.message) from None


if __name__ == "__main__":
    args, _ = argparse.ArgumentParser(parents=[model_server.parser]).parse_known_args()
    model = DigitsModel(args.model_name)
    model.load()
    ModelServer().start([model])
