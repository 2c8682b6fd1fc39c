"""Batch augmentation with tensor ops, on whatever device the batch is on.

The same policies as ``training.data.augmentation`` (the PIL path DataLoader workers run), drawn per
image from the same distributions, but for a whole batch at once: one gather or one ``grid_sample``
per batch, no per-image Python. Every random number comes from the ``generator`` passed in, so a
seeded generator gives the same batch twice (exact resume, DDP ranks with their own streams).

Input and output are float pixels in 0..255, (N, C, H, W): augmentation happens before the
contract's normalisation, so fills are black pixels exactly as PIL's are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The parameters of each policy, shared with the PIL path in training.data.augmentation.
CROP_PADDING = 4  # pixels of reflect padding before a random crop
AFFINE_DEGREES, AFFINE_TRANSLATE, AFFINE_SCALE = 10.0, 0.1, (0.9, 1.1)
RESIZED_CROP_SCALE, RESIZED_CROP_RATIO = (0.5, 1.0), (3 / 4, 4 / 3)


def augment_batch(policy: str, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augment ``x`` (N, C, H, W) float 0..255 with ``policy``; returns a new tensor."""
    if policy == "none":
        return x
    if policy == "flip":
        return flip(x, generator)
    if policy == "crop-flip":
        return crop_flip(x, generator)
    if policy == "affine":
        return random_affine(x, generator)
    if policy == "resized-crop":
        return resized_crop_flip(x, generator)
    from training.data import AUGMENTATIONS

    raise ValueError(f"unknown augmentation policy {policy!r}; choose one of {AUGMENTATIONS}")


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``RandomHorizontalFlip()``: each image mirrored with probability 1/2."""
    mirrored = torch.rand(x.shape[0], generator=g, device=x.device) < 0.5
    return torch.where(mirrored[:, None, None, None], x.flip(-1), x)


def crop_flip(x: torch.Tensor, g: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """``RandomCrop(padding, reflect)`` + ``RandomHorizontalFlip()``: one gather for the batch.

    Offsets are uniform in 0..2*padding on each axis (as torchvision draws them); a flipped image
    reads its crop's columns right to left.
    """
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding,) * 4, mode="reflect")  # (N, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=dev)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=dev)
    flip = torch.rand(n, generator=g, device=dev) < 0.5
    rows = dy[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # (N, W)
    return padded[
        torch.arange(n, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def random_affine(
    x: torch.Tensor,
    g: torch.Generator,
    degrees: float = AFFINE_DEGREES,
    translate: float = AFFINE_TRANSLATE,
    scale: tuple[float, float] = AFFINE_SCALE,
) -> torch.Tensor:
    """``RandomAffine(degrees, translate=(t, t), scale)``: rotation about the centre, whole-pixel
    shifts up to t * size, nearest-neighbour sampling, black outside (torchvision's defaults)."""
    n, _, h, w = x.shape
    dev = x.device
    angle = _uniform(n, -degrees, degrees, g, dev) * (math.pi / 180)
    s = _uniform(n, scale[0], scale[1], g, dev)
    # torchvision rounds the shift to whole pixels: round(U(-t * W, t * W)).
    tx = _uniform(n, -translate * w, translate * w, g, dev).round()
    ty = _uniform(n, -translate * h, translate * h, g, dev).round()
    # Output pixel p (pixels, from the centre) reads input q = R(-angle) (p - t) / s. affine_grid works
    # in coordinates normalised by the half-size D = diag(W/2, H/2): q_n = D^-1 R(-a) D p_n / s - D^-1 R(-a) t / s.
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack(
        [
            torch.stack([cos, sin * h / w, -(cos * tx + sin * ty) * 2 / w], 1),
            torch.stack([-sin * w / h, cos, -(-sin * tx + cos * ty) * 2 / h], 1),
        ],
        1,
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def resized_crop_boxes(
    n: int,
    h: int,
    w: int,
    g: torch.Generator,
    device,
    scale: tuple[float, float] = RESIZED_CROP_SCALE,
    ratio: tuple[float, float] = RESIZED_CROP_RATIO,
) -> torch.Tensor:
    """(N, 4) integer boxes (top, left, height, width) drawn as ``RandomResizedCrop.get_params``:
    up to 10 tries of area share and log-uniform aspect ratio; the first that fits wins, else the
    central crop clamped to the ratio range."""
    tries = 10
    area = _uniform(n * tries, scale[0], scale[1], g, device).view(n, tries) * (h * w)
    log_r = _uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), g, device).view(n, tries)
    aspect = torch.exp(log_r)
    cw = torch.sqrt(area * aspect).round()
    ch = torch.sqrt(area / aspect).round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.to(torch.uint8).argmax(1)  # first fitting try
    pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731
    cw, ch, found = pick(cw), pick(ch), ok.any(1)
    # Fallback (no try fitted): the whole image, trimmed to the nearest allowed aspect ratio.
    in_ratio = w / h
    fw, fh = (
        (w, round(w / ratio[0]))
        if in_ratio < ratio[0]
        else ((round(h * ratio[1]), h) if in_ratio > ratio[1] else (w, h))
    )
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    top = (torch.rand(n, generator=g, device=device) * (h - ch + 1)).floor()
    left = (torch.rand(n, generator=g, device=device) * (w - cw + 1)).floor()
    top = torch.where(found, top, ((h - ch) / 2).floor())
    left = torch.where(found, left, ((w - cw) / 2).floor())
    return torch.stack([top, left, ch, cw], 1)


def resized_crop_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``RandomResizedCrop(size, scale, ratio)`` + ``RandomHorizontalFlip()`` with bilinear
    resampling. The stored images are already at the contract size, so a crop is only ever enlarged
    and antialiasing (which acts when shrinking) changes nothing."""
    n, _, h, w = x.shape
    dev = x.device
    top, left, ch, cw = resized_crop_boxes(n, h, w, g, dev).unbind(1)
    flip = torch.rand(n, generator=g, device=dev) < 0.5
    # Output pixel u (normalised, align_corners=False) reads input x_n = (cw / W) u + (2 left + cw) / W - 1.
    sx = torch.where(flip, -cw / w, cw / w)
    zero = torch.zeros_like(sx)
    theta = torch.stack(
        [
            torch.stack([sx, zero, (2 * left + cw) / w - 1], 1),
            torch.stack([zero, ch / h, (2 * top + ch) / h - 1], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
