"""No-op TorchServe handler: answers every request without decoding or inference.

Served with the same batch settings as a real model, it measures TorchServe's own ceiling on this
machine (HTTP, queueing, batching, the frontend<->worker socket and JSON), the upper bound any
handler can reach.
"""

import json

_REPLY = json.dumps({"predictions": [{"label": "noop", "probability": 1.0}]})


def handle(data, context):
    if data is None:  # TorchServe's warm-up call at worker start
        return None
    return [_REPLY] * len(data)
