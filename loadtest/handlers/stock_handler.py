"""Baseline handler in the style of TorchServe's stock ``ImageClassifier``.

The stock handler (``ts.torch_handler.image_classifier``) imports captum at load time, which this
project does not install; this is the same pipeline without it: ``BaseHandler`` life cycle, PIL decode
and torchvision ``ToTensor`` + ``Normalize`` per image, the eager PyTorch model, softmax and top-5.
The model is rebuilt from the training checkpoint packed in the archive (the one model definition in
``training.models``), normalised with the checkpoint's contract. Serve it with OMP_NUM_THREADS=1, as
TorchServe's stock CPU set-up does.
"""

import base64
import io
import json
import os

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from ts.torch_handler.base_handler import BaseHandler

from training.checkpoint import load_checkpoint, model_from_checkpoint


class StockImageClassifier(BaseHandler):
    topk = 5

    def initialize(self, context):
        model_dir = context.system_properties.get("model_dir")
        ckpt = load_checkpoint(os.path.join(model_dir, "best.pt"))
        self.model, self.contract = model_from_checkpoint(ckpt)
        self.device = torch.device("cpu")
        self.image_processing = transforms.Compose(
            [
                transforms.Resize((self.contract.height, self.contract.width)),
                transforms.ToTensor(),
                transforms.Normalize(self.contract.mean, self.contract.std),
            ]
        )
        self.mode = "L" if self.contract.channels == 1 else "RGB"
        self.initialized = True

    def preprocess(self, data):
        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            if isinstance(image, str):
                image = base64.b64decode(image)
            if isinstance(image, (bytearray, bytes)):
                image = Image.open(io.BytesIO(image)).convert(self.mode)
                image = self.image_processing(image)
            else:
                image = torch.FloatTensor(image)
            images.append(image)
        return torch.stack(images).to(self.device)

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            return self.model(data)

    def postprocess(self, data):
        ps = F.softmax(data, dim=1)
        probs, classes = torch.topk(ps, min(self.topk, ps.shape[1]), dim=1)
        names = self.contract.class_names
        return [
            json.dumps({names[c]: p for c, p in zip(cs.tolist(), pr.tolist(), strict=True)})
            for pr, cs in zip(probs, classes, strict=True)
        ]
