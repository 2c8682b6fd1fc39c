"""The digits run on Seldon MLServer: an ``MLModel`` answering v2 requests (HTTP JSON, gRPC) through
``peer_core`` (``serving.core``, the code our handler runs). MLServer's adaptive batching
(model-settings.json: ``max_batch_size``, ``max_batch_time``) merges concurrent requests into one
``predict`` call along the first dimension and splits the flat outputs back, so every output keeps one
image per row.

    mlserver start bench/peers      # reads model-settings.json beside this file
"""

from __future__ import annotations

from mlserver import MLModel
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from peer_core import answer, load_core, to_items
from serving.core import InputError


class DigitsModel(MLModel):
    async def load(self) -> bool:
        self.core, self.info = load_core()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        tensor = payload.inputs[0]
        try:
            items = to_items(tensor.datatype, tensor.shape, list(tensor.data))
            outputs = answer(self.core, self.info, items)
        except InputError as e:
            raise InferenceError(e.message) from None
        return InferenceResponse(id=payload.id, model_name=self.name, model_version=self.version,
                                 outputs=[ResponseOutput(**o) for o in outputs])
