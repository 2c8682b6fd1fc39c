"""The inference core: encoded image bytes -> the model's contract -> a loaded variant -> top-k.

Runtime-agnostic and free of TorchServe: the handler (``serving.handler``) is a thin adapter over
these functions, and the unit tests call them directly. Everything the model expects (size, channels,
class names) comes from the ``Contract`` in the export manifest; nothing here re-declares it. Every
problem with client input raises ``InputError``, which the handler turns into an HTTP 4xx JSON body.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from training.contract import Contract
from training.data import to_contract

# Only these decoders are reachable from the network: the formats the API documents. Pillow can open
# dozens more (EPS shells out to Ghostscript, for one); a smaller attack surface costs nothing here.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")  # JPEG also opens MPO (phone photos)
INVERT_CHOICES = ("auto", "yes", "no")

# Modes converted to L/RGB. 16-bit grayscale is rescaled (Pillow's own convert clips it to 255);
# alpha is composited onto white, the colour a viewer shows behind a transparent image.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")


# Pillow's decoders signal bad bytes with OSError, SyntaxError, ValueError, EOFError, and on crafted
# files also struct.error, IndexError, TypeError... Every exception raised while decoding client bytes
# is caused by those bytes, so decode_image maps them all to a 4xx for that one image rather than let
# one file fail a whole TorchServe batch with a 503.


class InputError(ValueError):
    """A client error: becomes HTTP ``code`` with JSON ``{"code", "type", "message"}``.

    Attributes:
        code: HTTP status (4xx).
        type: a stable, machine-readable reason (also the ``Reason`` label of the rejection metric).
        message: names the problem and, where there is one, the fix.
    """

    def __init__(self, code: int, type: str, message: str) -> None:
        super().__init__(message)
        self.code, self.type, self.message = code, type, message

    def to_dict(self) -> dict:
        return {"code": self.code, "type": self.type, "message": self.message}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a worker.

    Attributes:
        max_images: images per request (a TorchServe batch may hold several requests).
        max_pixels: width x height of one decoded image, checked from the header before decoding.
            Also set as Pillow's ``MAX_IMAGE_PIXELS``, so Pillow refuses anything over twice this
            as a decompression bomb. 40 MP covers any phone photo; it decodes to ~120 MB RGB.
        max_image_bytes: size of one encoded image. Kept below TorchServe's ``max_request_size`` so
            that an oversized image gets this JSON 413; a body over ``max_request_size`` is refused
            by TorchServe's frontend (a bare 413) before the handler sees it.
        default_topk: classes returned per image when the request does not say.
    """

    max_images: int = 64
    max_pixels: int = 40_000_000
    max_image_bytes: int = 12 * 2**20
    default_topk: int = 5

    def __post_init__(self) -> None:
        if min(self.max_images, self.max_pixels, self.max_image_bytes, self.default_topk) < 1:
            raise ValueError(f"limits must be positive, got {self}")


@dataclass
class StageTimes:
    """Milliseconds spent per stage, summed over the images of a batch (feeds the handler metrics)."""

    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0


# --------------------------------------------------------------------------------------------------
# decode -> validate
# --------------------------------------------------------------------------------------------------
def decode_image(data: bytes, limits: Limits, draft: tuple[str, int] | None = None) -> Image.Image:
    """Decode the first frame of an encoded image, with the EXIF orientation applied.

    Args:
        data: the encoded file (PNG, JPEG, BMP, WebP, GIF, TIFF).
        limits: ``max_pixels`` is checked on the header, before any pixel is decoded.
        draft: (mode, size) for JPEG: decode at the smallest DCT scale that is still at least
            ``size`` pixels per side, so a 40 MP photo costs milliseconds, not a second.
    Raises:
        InputError: empty, not an image, over the pixel limit, truncated or corrupt.
    """
    if not data:
        raise InputError(400, "empty_body", "the request carries no image bytes")
    if len(data) > limits.max_image_bytes:
        raise InputError(413, "file_too_large", f"image file is {len(data)} bytes, over the limit of "
                                                f"{limits.max_image_bytes}; recompress or downscale it")
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow raises DecompressionBombError above 2x this
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x Pillow only warns; our own check below refuses those images.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise InputError(413, "decompression_bomb", f"image refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise InputError(415, "not_an_image",
                         f"the {len(data)} bytes sent are not an image in a supported format "
                         f"({', '.join(ALLOWED_FORMATS)})") from None
    except Exception as e:  # noqa: BLE001 -- see the note above InputError
        raise InputError(400, "corrupt_image", f"the image header is corrupt: {e!r}") from None
    w, h = img.size
    if w * h > limits.max_pixels:
        raise InputError(413, "image_too_large",
                         f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}; "
                         f"downscale it before sending")
    if w < 1 or h < 1:
        raise InputError(400, "corrupt_image", f"image has an empty size {w}x{h}")
    if draft is not None and img.format == "JPEG":
        img.draft(draft[0], (draft[1], draft[1]))
    try:
        img.seek(0)  # GIF/TIFF/WebP: the first frame
        img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 -- see the note above InputError
        truncated = isinstance(e, EOFError) or "truncated" in str(e)
        raise InputError(400, "truncated_image" if truncated else "corrupt_image",
                         f"could not decode the {img.format} image: {e or type(e).__name__}") from None
    return img


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any supported Pillow mode to "L" (channels=1) or "RGB" (channels=3).

    Raises:
        InputError: a mode with no meaningful 8-bit rendering (float, 32-bit integer beyond 16-bit).
    """
    target = "L" if channels == 1 else "RGB"
    mode = img.mode
    if mode in _16BIT_MODES or mode == "I":
        a = np.asarray(img)
        if mode == "I" and (a.min() < 0 or a.max() > 65535):
            raise InputError(415, "unsupported_mode",
                             f"32-bit integer image with values {a.min()}..{a.max()}; send 8- or 16-bit")
        img = Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), "L")  # 16-bit -> 8-bit
    elif mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode not in _ALPHA_MODES and mode not in _PLAIN_MODES:
        raise InputError(415, "unsupported_mode",
                         f"image mode {mode!r} is not supported; send 8-bit or 16-bit grayscale, "
                         f"palette, RGB, RGBA or CMYK")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert(target)


def has_light_background(gray: Image.Image) -> bool:
    """True when the outer ring of a grayscale image (a tenth of the short side) is mostly light.

    MNIST-style models (the 1-channel contracts here: digits, MNIST, Fashion-MNIST) were trained on
    light strokes on black; a photo or scan of ink on paper is the opposite and must be inverted.
    """
    a = np.asarray(gray)
    r = max(1, min(a.shape) // 10)
    ring = np.concatenate([a[:r].ravel(), a[-r:].ravel(), a[:, :r].ravel(), a[:, -r:].ravel()])
    ring.sort()  # the median by hand: np.median's overhead was 5-10x this on a 28x28 digit
    n = len(ring)
    return (int(ring[(n - 1) // 2]) + int(ring[n // 2])) / 2 > 127.5


def apply_invert(gray_or_rgb: Image.Image, invert: str, channels: int) -> Image.Image:
    """Invert dark-on-light input for light-on-dark models.

    ``invert``: "yes" always, "no" never, "auto" when the contract is 1-channel and the image border is
    light. An inverted photo's paper is rarely pure black, so the contrast is then stretched (1 % of
    pixels clipped at each end) to give the black background the model was trained on.
    """
    if invert not in INVERT_CHOICES:
        raise InputError(400, "bad_parameter", f"invert must be one of {INVERT_CHOICES}, got {invert!r}")
    if invert == "no" or (invert == "auto" and (channels != 1 or not has_light_background(gray_or_rgb))):
        return gray_or_rgb
    return ImageOps.autocontrast(ImageOps.invert(gray_or_rgb), cutoff=1)


# --------------------------------------------------------------------------------------------------
# to the contract -> run -> top-k
# --------------------------------------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)  # (N, K); shift for exp overflow
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(logits: np.ndarray, k: int, class_names: Sequence[str]) -> list[list[dict]]:
    """(N, K) logits -> per image, the k most probable ``{label, index, probability}``, best first."""
    probs = softmax(logits.astype(np.float64))
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"label": class_names[j], "index": int(j), "probability": round(float(p[j]), 6)}
             for j in row] for p, row in zip(probs, order)]


def _chw(img) -> np.ndarray:
    """A PIL image or a (C, H, W) tensor, as training's ``to_contract`` returns -> (C, H, W) uint8."""
    if isinstance(img, Image.Image):
        a = np.asarray(img, dtype=np.uint8)
        return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.ascontiguousarray(img.numpy(), dtype=np.uint8)


class InferenceCore:
    """One loaded variant plus the preprocessing its contract asks for.

    Args:
        runner: an ``export.runtime.Runner`` (or anything with ``contract``, ``variant``, ``device``
            and ``__call__((N, C, H, W) uint8) -> (N, K) logits``).
        limits: request limits.
    """

    def __init__(self, runner, limits: Limits = Limits()) -> None:
        self.runner, self.limits = runner, limits
        self.contract: Contract = runner.contract
        # training.data.to_contract: the very resize training and evaluation use (the mode is already
        # L/RGB by then, so its mode step is a no-op).
        self._resize = v2.Compose(to_contract(self.contract))
        self._draft = ("L" if self.contract.channels == 1 else "RGB",
                       max(self.contract.height, self.contract.width))

    def check_topk(self, topk: int | None) -> int:
        k = self.limits.default_topk if topk is None else topk
        n = self.contract.num_classes
        if not 1 <= k <= n:
            raise InputError(400, "bad_parameter", f"topk must be between 1 and {n}, got {k}")
        return min(k, n)

    def to_pixels(self, item: bytes | np.ndarray, invert: str = "auto",
                  times: StageTimes | None = None) -> np.ndarray:
        """One encoded image (or contract-shaped uint8 pixels) -> (C, H, W) uint8 at the contract."""
        times = times if times is not None else StageTimes()
        c = self.contract
        if isinstance(item, np.ndarray):  # already pixels (KServe v2 UINT8 tensors): only validated
            if item.dtype != np.uint8 or item.shape != c.input_shape:
                raise InputError(400, "bad_tensor", f"pixels must be uint8 {c.input_shape} (C, H, W), "
                                                    f"got {item.dtype} {item.shape}")
            return item
        t0 = time.perf_counter()
        img = decode_image(item, self.limits, self._draft)
        t1 = time.perf_counter()
        img = apply_invert(to_mode(img, c.channels), invert, c.channels)
        pixels = _chw(self._resize(img))
        times.decode_ms += (t1 - t0) * 1e3
        times.preprocess_ms += (time.perf_counter() - t1) * 1e3
        return pixels

    def infer(self, pixels: np.ndarray, times: StageTimes | None = None) -> np.ndarray:
        """(N, C, H, W) uint8 -> (N, K) float32 logits."""
        t0 = time.perf_counter()
        logits = self.runner(pixels)
        if times is not None:
            times.inference_ms += (time.perf_counter() - t0) * 1e3
        return logits

    def classify(self, items: Sequence[bytes | np.ndarray], topk: int | None = None,
                 invert: str = "auto") -> list[list[dict]]:
        """Encoded images -> top-k per image. The handler batches across requests instead."""
        k = self.check_topk(topk)
        pixels = np.stack([self.to_pixels(x, invert) for x in items])
        return top_k(self.infer(pixels), k, self.contract.class_names)
