"""NVIDIA Triton Python-backend model serving an exported visionpipe run with the project's own core.

Triton's dynamic batcher hands ``execute`` several requests at once (like a TorchServe batch); each
request's encoded image goes through ``serving.core.InferenceCore.to_pixels`` (the decode our handler
runs), the images of all requests through one model call, and top-k per request comes back as three
output tensors (LABEL, INDEX, PROBABILITY). ``loadtest.triton_peer`` writes the model repository and
the ``parameters`` this file reads (the artifact directory, the variant, intra-op threads, k). It runs
inside Triton's stub process, whose embedded Python is Debian's libpython3.11, with the project and
its virtualenv on its path (see loadtest/triton_peer.py).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        from export.runtime import load_variant
        from serving.core import InferenceCore, InputError, top_k

        self.InputError, self.top_k = InputError, top_k
        runner = load_variant(params["artifact_dir"], params["variant"] or None, threads=int(params["threads"]))
        self.core = InferenceCore(runner)
        self.k = int(params["topk"])
        self.names = self.core.contract.class_names

    def execute(self, requests):
        responses = [None] * len(requests)
        pixels = {}
        for i, request in enumerate(requests):
            data = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()  # (n, 1) bytes objects
            try:
                pixels[i] = np.stack([self.core.to_pixels(bytes(x)) for x in data.reshape(-1)])
            except self.InputError as e:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(e.message, pb_utils.TritonError.INVALID_ARG)
                )
        if pixels:
            order = sorted(pixels)
            logits = self.core.infer(np.concatenate([pixels[i] for i in order]))
            offset = 0
            for i in order:
                n = len(pixels[i])
                rows = self.top_k(logits[offset : offset + n], self.k, self.names, self.core.temperature)
                offset += n
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("LABEL", np.array([[c["label"] for c in r] for r in rows], dtype=object)),
                        pb_utils.Tensor("INDEX", np.array([[c["index"] for c in r] for r in rows], dtype=np.int64)),
                        pb_utils.Tensor(
                            "PROBABILITY", np.array([[c["probability"] for c in r] for r in rows], dtype=np.float32)
                        ),
                    ]
                )
        return responses
