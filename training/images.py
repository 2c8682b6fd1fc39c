"""The one image conversion: any decoded image -> the contract's mode and size.

Training (every dataset, ImageFolder files included) and serving (every request) call the same
functions, so a model serves on exactly the pixels it was trained on: the same EXIF orientation, the
same 16-bit rescale, the same alpha handling, the same resize. Serving adds only what a network client
needs on top (byte/pixel limits before decoding, optional inversion: ``serving.core``).

Pure Pillow: no torch, so that serving's decode path does not import the training stack.
"""

from __future__ import annotations

import io
import os
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from training.contract import Contract

# The formats a file or request may be in. Pillow can open dozens more (EPS shells out to Ghostscript,
# for one); a smaller attack surface costs nothing. JPEG also opens MPO (phone photos).
FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # files in those formats


def is_image_file(path: str) -> bool:
    """An ImageFolder file training reads: the formats serving accepts (torchvision's own list
    leaves out GIF and adds formats serving refuses)."""
    return path.lower().endswith(EXTENSIONS)


# Modes converted to L/RGB. 16-bit grayscale is rescaled (Pillow's own convert clips it to 255);
# alpha is composited onto white, the colour a viewer shows behind a transparent image.
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")

# A large image is first reduced by an integer factor (a box filter, cheap) while it stays at least this
# many times the target size, then resampled, as Pillow's ``reducing_gap`` does; the reduction comes
# before the mode conversion, so alpha compositing and 16-bit rescaling run on the small image. A
# 40 MP RGBA PNG then costs its decode plus tens of milliseconds instead of seconds, for a result
# "nearly indistinguishable" from a direct resize (Pillow's docs), and the same in training and serving.
REDUCING_GAP = 3.0


class UnsupportedImage(ValueError):
    """An image whose mode has no meaningful 8-bit rendering (float, 32-bit integer)."""


def mode_for(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def open_image(fp: str | os.PathLike | IO[bytes]) -> Image.Image:
    """Open (header only, nothing decoded yet) in one of ``FORMATS``."""
    return Image.open(fp, formats=FORMATS)


def draft(img: Image.Image, contract: Contract) -> Image.Image:
    """JPEG only: decode at the smallest DCT scale (1/2, 1/4, 1/8) still at least the contract size per
    side. Must run before the pixels are loaded; a no-op for every other format."""
    if img.format == "JPEG":
        side = max(contract.height, contract.width)
        img.draft(mode_for(contract.channels), (side, side))
    return img


def load(img: Image.Image) -> Image.Image:
    """Decode the first frame (GIF/TIFF/WebP may hold more) and apply the EXIF orientation."""
    img.seek(0)
    img.load()
    return ImageOps.exif_transpose(img)


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any supported Pillow mode -> "L" (channels=1) or "RGB" (channels=3).

    Raises:
        UnsupportedImage: float images, 32-bit integer images beyond the 16-bit range, unknown modes.
    """
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        a = np.asarray(img)
        if mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            raise UnsupportedImage(f"32-bit integer image with values {a.min()}..{a.max()}; send 8- or 16-bit")
        img = Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), "L")  # 16-bit -> 8-bit
    elif (mode == "P" and "transparency" in img.info) or mode == "PA":
        img = img.convert("RGBA")
    elif mode not in ALPHA_MODES and mode not in PLAIN_MODES:
        raise UnsupportedImage(
            f"image mode {mode!r} is not supported; send 8-bit or 16-bit grayscale, palette, RGB, RGBA or CMYK"
        )
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    target = mode_for(channels)
    return img if img.mode == target else img.convert(target)


def shrink(img: Image.Image, contract: Contract) -> Image.Image:
    """Box-reduce by the largest integer factor that keeps the image at least REDUCING_GAP times the
    contract size (a no-op for images near the contract size, so training data is untouched)."""
    factor = int(min(img.width / contract.width, img.height / contract.height) / REDUCING_GAP)
    if factor < 2 or img.mode == "P":  # palette indices cannot be averaged: converted at full size
        return img
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode in SIXTEEN_BIT_MODES:
        img = img.convert("I")  # Image.reduce has no 16-bit modes; "I" holds the same values
    return img.reduce(factor)


def to_size(img: Image.Image, contract: Contract) -> Image.Image:
    """Resize to the contract's (height, width), antialiased (bilinear with a reducing gap)."""
    size = (contract.width, contract.height)
    if img.size == size:
        return img
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)


def to_contract(img: Image.Image, contract: Contract) -> Image.Image:
    """A decoded image -> the contract's mode and size (what every model input goes through)."""
    return to_size(to_channels(shrink(img, contract), contract.channels), contract)


def to_array(img: Image.Image) -> np.ndarray:
    """An L or RGB image -> (C, H, W) uint8, the layout exported graphs take."""
    a = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))


def encode_png(chw: np.ndarray) -> bytes:
    """(C, H, W) uint8 -> PNG bytes (grey for C=1, RGB for C=3): the inverse of ``to_array``, for
    clients that post pixels (the CLI, load tests, the test suite)."""
    a = np.ascontiguousarray(chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def read_file(path: str | os.PathLike, contract: Contract) -> Image.Image:
    """An image file at the contract's mode and size: the ImageFolder loader of training."""
    with open(path, "rb") as f:
        return to_contract(load(draft(open_image(f), contract)), contract)
