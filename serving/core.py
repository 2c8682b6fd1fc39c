"""The inference core: encoded image bytes -> the model's contract -> a loaded variant -> top-k.

Runtime-agnostic and free of TorchServe: the handler (``serving.handler``) is a thin adapter over
these functions, and the unit tests call them directly. Everything the model expects (size, channels,
class names) comes from the ``Contract`` in the export manifest; nothing here re-declares it. Every
problem with client input raises ``InputError``, which the handler turns into an HTTP 4xx JSON body.
"""

from __future__ import annotations

import io
import math
import reprlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from training import images
from training.contract import Contract

ALLOWED_FORMATS = images.FORMATS  # only these decoders are reachable from the network
INVERT_CHOICES = ("auto", "yes", "no")

# Client text echoed in an error message (an option value, a field name, a v2 datatype) is cut to
# this many characters, and a whole message to MAX_MESSAGE: an error answer and its log line stay
# small whatever the request holds. (A 7 MB option echoed back once made the answer exceed
# TorchServe's max_response_size, and the frontend killed the worker.)
MAX_ECHO = 48
MAX_MESSAGE = 400

# Below this many pixels an image is never "bomb-like", whatever its size in bytes: a flat 28x28
# PNG is 70 bytes, and a megapixel decodes in a few milliseconds.
RATIO_FREE_PIXELS = 1_000_000

# Text chunks carry nothing a classifier uses; Pillow's defaults let one PNG inflate 64 MB of them.
PngImagePlugin.MAX_TEXT_CHUNK = 64 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 256 * 1024


_ECHO = reprlib.Repr()  # (Python 3.11's Repr takes no keyword arguments)
_ECHO.maxstring = _ECHO.maxother = MAX_ECHO  # bytes have no repr_ of their own: maxother cuts them
_ECHO.maxlist, _ECHO.maxdict, _ECHO.maxlevel = 6, 4, 2


def clip(value) -> str:
    """A short ``repr`` of client-supplied data (text, numbers, lists): never more than ~2 x MAX_ECHO
    characters, whatever the value holds."""
    if isinstance(value, (str, bytes, bytearray)) and len(value) > MAX_ECHO:
        return f"{_ECHO.repr(value[:MAX_ECHO])}... ({len(value)} long)"
    return _ECHO.repr(value)[: 2 * MAX_ECHO]


# Pillow's decoders signal bad bytes with OSError, SyntaxError, ValueError, EOFError, and on crafted
# files also struct.error, IndexError, TypeError... Every exception raised while decoding client bytes
# is caused by those bytes, so decoding maps them all to a 4xx for that one image rather than let
# one file fail a whole TorchServe batch.


class InputError(ValueError):
    """A client error: becomes HTTP ``code`` with JSON ``{"code", "type", "message"}``.

    Attributes:
        code: HTTP status (4xx; 503 when the batch's pixel budget is spent).
        type: a stable, machine-readable reason (also the ``Reason`` label of the rejection metric).
        message: names the problem and, where there is one, the fix; at most MAX_MESSAGE characters.
    """

    def __init__(self, code: int, reason: str, message: str) -> None:
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        super().__init__(message)
        self.code, self.type, self.message = code, reason, message

    def to_dict(self) -> dict:
        return {"code": self.code, "type": self.type, "message": self.message}


@dataclass(frozen=True)
class Limits:
    """What one request, and one model call, may ask of a worker.

    Every image's header is read before any pixel is decoded, so each check below refuses a request
    before it costs anything. docs/serving.md gives the measured worst case each limit admits.

    Attributes:
        max_images: images per request (a TorchServe batch may hold several requests).
        max_pixels: width x height of one image. Also set as Pillow's ``MAX_IMAGE_PIXELS``.
        max_request_pixels: pixels one request may make the worker decode, summed over its images
            (a JPEG counts at its draft size: see ``training.images.draft``).
        max_batch_pixels: the same sum over one model call (all requests TorchServe batched
            together). Requests are admitted cheapest first; one that no longer fits is answered 503
            (retry). Room for one request at the limit plus the small ones batched with it: a model
            call never decodes two of the costliest requests, so the normal requests that share a
            worker with an attacker wait for one of them at most.
        max_pixels_per_byte: decoded pixels per encoded byte above which an image of more than
            RATIO_FREE_PIXELS pixels is refused as bomb-like (413) before decoding. A 6300x6300
            1-bit PNG is ~5 KB: 8,000 pixels per byte. Photos are under 10, flat scans a few hundred.
        max_image_bytes: size of one encoded image. Kept below TorchServe's ``max_request_size`` so
            that an oversized image gets this JSON 413; a body over ``max_request_size`` is refused
            by TorchServe's frontend (a bare 413) before the handler sees it.
        max_response_bytes: size of one answer; kept well below TorchServe's ``max_response_size``
            (an answer over that makes the frontend kill the worker).
        default_topk: classes returned per image when the request does not say.
    """

    max_images: int = 64
    max_pixels: int = 40_000_000
    max_request_pixels: int = 16_000_000
    max_batch_pixels: int = 20_000_000
    max_pixels_per_byte: int = 256
    max_image_bytes: int = 12 * 2**20
    max_response_bytes: int = 2**20
    default_topk: int = 5

    def __post_init__(self) -> None:
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        bad = {k: v for k, v in values.items() if type(v) is not int or v < 1}
        if bad:
            raise ValueError(f"limits must be positive integers, got {bad}")


@dataclass
class StageTimes:
    """Milliseconds spent per stage, summed over the images of a batch (feeds the handler metrics)."""

    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0


# --------------------------------------------------------------------------------------------------
# open (header only) -> check -> decode
# --------------------------------------------------------------------------------------------------
def open_image(data: bytes, limits: Limits, contract: Contract | None = None) -> Image.Image:
    """Read an encoded image's header and refuse it before decoding if it is too big or bomb-like.

    Args:
        data: the encoded file (PNG, JPEG, BMP, WebP, GIF, TIFF).
        limits: ``max_image_bytes``, ``max_pixels`` and ``max_pixels_per_byte`` are checked here.
        contract: when given, a JPEG is set to decode at its draft size for this contract (its
            ``size`` is then the decoded size, what ``pixel_cost`` counts).
    Returns:
        The opened image, pixels not yet decoded: pass it to ``decode``.
    Raises:
        InputError: empty, not an image, over a limit, or a corrupt header.
    """
    if not data:
        raise InputError(400, "empty_body", "the request carries no image bytes")
    if len(data) > limits.max_image_bytes:
        raise InputError(
            413,
            "file_too_large",
            f"image file is {len(data)} bytes, over the limit of {limits.max_image_bytes}; recompress or downscale it",
        )
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow raises DecompressionBombError above 2x this
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x Pillow only warns (our own check below refuses those images); on
            # crafted files it warns about bad tags: noise a client could flood the log with.
            warnings.simplefilter("ignore")
            img = images.open_image(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise InputError(413, "decompression_bomb", f"image refused as a decompression bomb: {clip(str(e))}") from None
    except UnidentifiedImageError:
        raise InputError(
            415,
            "not_an_image",
            f"the {len(data)} bytes sent are not an image in a supported format ({', '.join(ALLOWED_FORMATS)})",
        ) from None
    except Exception as e:  # noqa: BLE001 -- see the note above InputError
        raise InputError(400, "corrupt_image", f"the image header is corrupt: {clip(str(e))}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError(400, "corrupt_image", f"image has an empty size {w}x{h}")
    if w * h > limits.max_pixels:
        raise InputError(
            413,
            "image_too_large",
            f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}; downscale it before sending",
        )
    if w * h > RATIO_FREE_PIXELS and w * h > limits.max_pixels_per_byte * len(data):
        raise InputError(
            413,
            "bomb_like_image",
            f"image is {w}x{h} pixels in {len(data)} bytes ({w * h // len(data)} pixels per "
            f"byte, limit {limits.max_pixels_per_byte}): refused as a decompression bomb; "
            f"send it at the size the model needs",
        )
    if contract is not None:
        try:
            images.draft(img, contract)
        except Exception as e:  # noqa: BLE001 -- see the note above InputError
            raise InputError(400, "corrupt_image", f"the JPEG header is corrupt: {clip(str(e))}") from None
    return img


def pixel_cost(img: Image.Image) -> int:
    """Pixels decoding ``img`` will produce (at its draft size for a JPEG)."""
    return img.size[0] * img.size[1]


def decode(img: Image.Image) -> Image.Image:
    """Decode an image ``open_image`` admitted: first frame, EXIF orientation applied.

    Raises:
        InputError: truncated or corrupt pixel data.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # crafted files' tag warnings: client-made log noise
            return images.load(img)
    except Exception as e:  # noqa: BLE001 -- see the note above InputError
        truncated = isinstance(e, EOFError) or "truncated" in str(e)
        raise InputError(
            400,
            "truncated_image" if truncated else "corrupt_image",
            f"could not decode the {img.format} image: {clip(str(e) or type(e).__name__)}",
        ) from None


def decode_image(data: bytes, limits: Limits, contract: Contract | None = None) -> Image.Image:
    """``open_image`` then ``decode``: one encoded image -> a decoded PIL image."""
    return decode(open_image(data, limits, contract))


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """``training.images.to_channels`` (the conversion training uses), its refusals as 415."""
    try:
        return images.to_channels(img, channels)
    except images.UnsupportedImage as e:
        raise InputError(415, "unsupported_mode", str(e)) from None


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
    pixels clipped at each end) to give the black background the model was trained on. Runs on the
    contract-sized image (inversion commutes with resizing), so it costs nothing on a large photo.
    """
    if invert not in INVERT_CHOICES:
        raise InputError(400, "bad_parameter", f"invert must be one of {INVERT_CHOICES}, got {clip(invert)}")
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


def top_k(logits: np.ndarray, k: int, class_names: Sequence[str], temperature: float = 1.0) -> list[list[dict]]:
    """(N, K) logits -> per image, the k most probable ``{label, index, probability}``, best first.

    The one place served probabilities are made: ``softmax(logits / temperature)``, with the
    temperature export fitted (manifest ``calibration``, ``export.calibrate``) so that they mean what
    they say; a positive temperature never changes the order.
    """
    probs = softmax(logits.astype(np.float64) / temperature)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"label": class_names[j], "index": int(j), "probability": round(float(p[j]), 6)} for j in row]
        for p, row in zip(probs, order, strict=True)
    ]


def check_min_confidence(value: float) -> float:
    """An abstain threshold: a number in [0, 1] (0 never abstains; NaN and inf are refused)."""
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"min_confidence must be a number from 0 to 1 (0: never abstain), got {value!r}")
    return value


def abstains(topk_lists: list[list[dict]], min_confidence: float) -> list[bool]:
    """Per image: is its top probability below ``min_confidence``? (0 never abstains.) The answer still
    carries its top-k; the flag says the model is not confident enough to act on it."""
    return [bool(row) and row[0]["probability"] < min_confidence for row in topk_lists]


class InferenceCore:
    """One loaded variant plus the preprocessing its contract asks for.

    A request's images go through ``open`` (headers only: every limit is checked before anything is
    decoded, and ``cost`` says what decoding will take), then ``finish`` (decode, the contract
    conversion training uses, inversion), then ``infer`` on the whole batch.

    Args:
        runner: an ``export.runtime.Runner`` (or anything with ``contract``, ``variant``, ``device``
            and ``__call__((N, C, H, W) uint8) -> (N, K) logits``; with ``infer`` and ``detector``
            it also gives out-of-distribution scores).
        limits: request limits.
        min_confidence: the model's default abstain threshold (a request may give its own).
    """

    def __init__(self, runner, limits: Limits = Limits(), min_confidence: float = 0.0) -> None:
        self.runner, self.limits, self.min_confidence = runner, limits, min_confidence
        self.contract: Contract = runner.contract
        # the detector export fitted (export.ood); None for a model exported before it existed: its
        # answers carry no ood flag
        self.detector = getattr(runner, "detector", None)
        # probabilities are softmax(logits / T); manifests exported before calibration existed: T = 1
        calibration = (getattr(runner, "manifest", None) or {}).get("calibration") or {}
        self.temperature = float(calibration.get("temperature", 1.0))
        if not self.temperature > 0:
            raise ValueError(
                f"manifest calibration temperature must be > 0, got {self.temperature}; re-run make export"
            )

    def check_topk(self, topk: int | None) -> int:
        k = self.limits.default_topk if topk is None else topk
        n = self.contract.num_classes
        if not 1 <= k <= n:
            raise InputError(400, "bad_parameter", f"topk must be between 1 and {n}, got {k}")
        return min(k, n)

    def open(self, item: bytes | np.ndarray) -> Image.Image | np.ndarray:
        """An encoded image -> opened and checked (``open_image``); contract pixels -> validated."""
        c = self.contract
        if isinstance(item, np.ndarray):  # already pixels (KServe v2 UINT8 tensors): only validated
            if item.dtype != np.uint8 or item.shape != c.input_shape:
                raise InputError(
                    400, "bad_tensor", f"pixels must be uint8 {c.input_shape} (C, H, W), got {item.dtype} {item.shape}"
                )
            return item
        return open_image(item, self.limits, c)

    def open_request(self, items: Sequence[bytes | np.ndarray]) -> tuple[list, int]:
        """All images of one request opened, and the pixels decoding them costs.

        Raises:
            InputError: any image refused, or 413 when the request's images together exceed
                ``max_request_pixels``.
        """
        opened = [self.open(x) for x in items]
        cost = sum(pixel_cost(o) for o in opened if isinstance(o, Image.Image))
        if cost > self.limits.max_request_pixels:
            raise InputError(
                413,
                "request_too_large",
                f"the {len(opened)} images of this request decode to {cost} pixels, over "
                f"the limit of {self.limits.max_request_pixels}; send fewer or smaller images",
            )
        return opened, cost

    def finish(
        self, opened: Image.Image | np.ndarray, invert: str = "auto", times: StageTimes | None = None
    ) -> np.ndarray:
        """An opened image -> (C, H, W) uint8 at the contract (decode, convert, invert)."""
        if isinstance(opened, np.ndarray):
            return opened
        times = times if times is not None else StageTimes()
        t0 = time.perf_counter()
        img = decode(opened)
        t1 = time.perf_counter()
        try:
            img = images.to_contract(img, self.contract)
        except images.UnsupportedImage as e:
            raise InputError(415, "unsupported_mode", str(e)) from None
        img = apply_invert(img, invert, self.contract.channels)
        pixels = images.to_array(img)
        times.decode_ms += (t1 - t0) * 1e3
        times.preprocess_ms += (time.perf_counter() - t1) * 1e3
        return pixels

    def to_pixels(self, item: bytes | np.ndarray, invert: str = "auto", times: StageTimes | None = None) -> np.ndarray:
        """One encoded image (or contract-shaped uint8 pixels) -> (C, H, W) uint8 at the contract."""
        t0 = time.perf_counter()
        opened = self.open(item)
        if times is not None:
            times.decode_ms += (time.perf_counter() - t0) * 1e3
        return self.finish(opened, invert, times)

    def infer(self, pixels: np.ndarray, times: StageTimes | None = None) -> np.ndarray:
        """(N, C, H, W) uint8 -> (N, K) float32 logits."""
        return self.predict(pixels, times)[0]

    def predict(self, pixels: np.ndarray, times: StageTimes | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, C, H, W) uint8 -> (N, K) float32 logits and (N,) out-of-distribution scores (None
        without a detector). The score is the runner's (``export.runtime.Runner.infer``): the same
        code export measured it with."""
        t0 = time.perf_counter()
        if self.detector is None:
            logits, scores = self.runner(pixels), None
        else:
            logits, scores = self.runner.infer(pixels)
        if times is not None:
            times.inference_ms += (time.perf_counter() - t0) * 1e3
        return logits, scores

    def ood_flags(self, scores: np.ndarray | None) -> list[bool] | None:
        """Per image: is it out of distribution (score above the detector's threshold)? None
        without a detector."""
        if scores is None or self.detector is None:
            return None
        return [bool(f) for f in self.detector.flags(scores)]

    def classify(
        self, items: Sequence[bytes | np.ndarray], topk: int | None = None, invert: str = "auto"
    ) -> list[list[dict]]:
        """Encoded images -> top-k per image. The handler batches across requests instead."""
        k = self.check_topk(topk)
        opened, _ = self.open_request(items)
        pixels = np.stack([self.finish(o, invert) for o in opened])
        return top_k(self.infer(pixels), k, self.contract.class_names, self.temperature)
