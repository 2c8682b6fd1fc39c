"""``visualize``: first-layer filters and the feature maps of one image, as PNG grids."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.utils import make_grid, save_image

from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import build_transform


def visualize(checkpoint: str | Path, image: str | Path | None, out_dir: str | Path | None = None,
              max_maps: int = 64) -> list[Path]:
    """Write ``filters.png`` (first conv layer) and, given an image, ``features_<layer>.png`` for each
    conv layer. Returns the written paths."""
    model, contract = model_from_checkpoint(load_checkpoint(checkpoint))
    out = Path(out_dir) if out_dir else Path(checkpoint).parent / "visualize"
    out.mkdir(parents=True, exist_ok=True)
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{checkpoint}: model {type(model).__name__} has no Conv2d layer to visualize")
    written = []
    w = convs[0][1].weight.detach()  # (out, in, kh, kw)
    w = w if w.shape[1] in (1, 3) else w.mean(1, keepdim=True)
    path = out / "filters.png"
    save_image(make_grid(w, nrow=8, normalize=True, scale_each=True, padding=1), path)
    written.append(path)
    if image is not None:
        x = build_transform(contract)(Image.open(image)).unsqueeze(0)  # (1, C, H, W)
        maps: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda _m, _i, o, n=name: maps.__setitem__(n, o.detach()))
                 for name, m in convs]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        for name, fmap in maps.items():
            f = fmap[0, :max_maps].unsqueeze(1)  # (C, 1, H, W): one gray tile per channel
            path = out / f"features_{name.replace('.', '_')}.png"
            save_image(make_grid(f, nrow=8, normalize=True, scale_each=True, padding=1), path)
            written.append(path)
    return written
