"""``visualize``: first-layer filters and the feature maps of one image, as labelled PNG figures.

Filters are a few pixels wide (5x5 for mnist_cnn): each is drawn as one upscaled tile (nearest
neighbour, no smoothing) with its index, normalised per filter (the sign pattern is what matters;
the shared colour bar would wash most of them out). Each feature-map figure shows the input the
model saw (after the contract's resize and channel conversion) beside its layer's channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import build_transform
from training.files import atomic_write_bytes


def visualize(
    checkpoint: str | Path, image: str | Path | None, out_dir: str | Path | None = None, max_maps: int = 32
) -> list[Path]:
    """Write ``filters.png`` (first conv layer) and, given an image, ``features_<layer>.png`` for each
    conv layer (its first ``max_maps`` channels). Returns the written paths."""
    ckpt = load_checkpoint(checkpoint)
    model, contract = model_from_checkpoint(ckpt)
    out = Path(out_dir) if out_dir else Path(checkpoint).parent / "visualize"
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{checkpoint}: model {type(model).__name__} has no Conv2d layer to visualize")
    run = Path(checkpoint).parent.name
    name, first = convs[0]
    written = [
        plot_filters(
            first.weight.detach(),
            out / "filters.png",
            f"{run} ({ckpt['arch']}): layer {name}, {first.out_channels} filters "
            f"{first.kernel_size[0]}x{first.kernel_size[1]} over {first.in_channels} "
            f"input channel(s)",
        )
    ]
    if image is not None:
        if not Path(image).is_file():
            raise FileNotFoundError(
                f"--image {image} does not exist; make demo and make export write samples, e.g. samples/{run}/"
            )
        x = build_transform(contract)(Image.open(image)).unsqueeze(0)  # (1, C, H, W), normalised
        maps: dict[str, torch.Tensor] = {}
        # clone: an in-place ReLU after the conv (cifarnet's) would otherwise rewrite the stored map
        hooks = [
            m.register_forward_hook(lambda _m, _i, o, n=n: maps.__setitem__(n, o.detach().clone())) for n, m in convs
        ]
        with torch.no_grad():
            probs = torch.softmax(model(x), 1)[0]
        for h in hooks:
            h.remove()
        top = int(probs.argmax())
        seen = _unnormalise(x[0], contract)  # (H, W) or (H, W, 3) in 0..1
        for layer, fmap in maps.items():
            path = out / f"features_{layer.replace('.', '_')}.png"
            title = (
                f"{run}: layer {layer} output, {fmap.shape[1]} channels {fmap.shape[2]}x{fmap.shape[3]}"
                + (f" (first {max_maps} shown)" if fmap.shape[1] > max_maps else "")
                + f"; input {Path(image).name}, predicted {contract.class_names[top]} "
                f"(p={float(probs[top]):.3f}, uncalibrated)"
            )
            written.append(plot_feature_maps(fmap[0, :max_maps], seen, path, title))
    return written


def _unnormalise(x: torch.Tensor, contract) -> np.ndarray:
    """(C, H, W) normalised -> the pixels the model saw, 0..1, (H, W) grey or (H, W, 3)."""
    mean = torch.tensor(contract.mean).view(-1, 1, 1)
    std = torch.tensor(contract.std).view(-1, 1, 1)
    px = (x * std + mean).clamp(0, 1).numpy()
    return px[0] if px.shape[0] == 1 else px.transpose(1, 2, 0)


def _tile(a: np.ndarray) -> np.ndarray:
    """Scale one tile to 0..1 on its own range (a flat tile becomes mid-grey)."""
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.full_like(a, 0.5)


def _grid(n: int) -> tuple[int, int]:
    cols = min(8, n)
    return -(-n // cols), cols


def plot_filters(w: torch.Tensor, path: Path, title: str) -> Path:
    """(out, in, kh, kw) weights as a labelled grid of upscaled tiles: RGB for 3 input channels, else the
    mean over input channels in a diverging map (red positive, blue negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = w.float().cpu().numpy()
    rows, cols = _grid(len(w))
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols + 0.4, 1.3 * rows + 0.7), dpi=100, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(w):
            continue
        if w.shape[1] == 3:
            ax.imshow(_tile(w[i]).transpose(1, 2, 0), interpolation="nearest")
        else:
            f = w[i].mean(0)
            lim = float(np.abs(f).max()) or 1.0
            ax.imshow(f, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"#{i}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_feature_maps(fmap: torch.Tensor, seen: np.ndarray, path: Path, title: str) -> Path:
    """The input (left, large) beside a labelled grid of one layer's channels (C, H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmap = fmap.float().cpu().numpy()
    rows, cols = _grid(len(fmap))
    fig = plt.figure(figsize=(1.25 * cols + 3.2, max(3.2, 1.3 * rows + 0.8)), dpi=100)
    grid = fig.add_gridspec(rows, cols + 3)
    ax = fig.add_subplot(grid[:, :3])
    ax.imshow(seen, cmap="gray" if seen.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title("input (as the model sees it)", fontsize=8)
    ax.set_axis_off()
    for i, f in enumerate(fmap):
        ax = fig.add_subplot(grid[i // cols, 3 + i % cols])
        ax.imshow(_tile(f), cmap="viridis", interpolation="nearest")
        ax.set_title(f"ch {i}", fontsize=7)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path
