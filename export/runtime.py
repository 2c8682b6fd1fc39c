"""Load an exported model variant from ``artifacts/<RUN>/`` and run it: the one loader that export's
parity checks, the tests and the server all use.

Every variant file is checked against the sha256 recorded in ``manifest.json`` before it is loaded, so
a server can never run bytes that differ from what export verified. Exported graphs take uint8 NCHW
pixels and normalise inside the graph; a ``Runner`` maps ``(N, C, H, W) uint8`` to ``(N, K) float32``
logits whatever the runtime, and (``Runner.infer``) to the out-of-distribution score of each image:
the graph's second output, its penultimate features, through the detector export fitted
(``export.ood``; ``ood.npz``, hash-checked like the variants). A variant exported before the detector
existed has one output and no detector: its scores are None.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export import registry
from export.ood import Detector, load_detector
from training.contract import Contract

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
DEVICE_TYPES = ("cpu", "cuda")
VARIANTS = registry.VARIANTS  # the built-in variant names (export.registry is the table)


class IntegrityError(RuntimeError):
    """An artifact file is missing or its sha256 differs from the manifest's."""


class SelfCheckError(RuntimeError):
    """No variant reproduces the export's answers on the reference batch on this machine."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: str | os.PathLike, expected_sha256: str) -> None:
    """Raise ``IntegrityError`` unless ``path`` exists and hashes to ``expected_sha256``."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(
            f"{path}: file missing (expected sha256 {expected_sha256}); re-run `make export RUN={path.parent.name}`"
        )
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise IntegrityError(
            f"{path}: sha256 mismatch: expected {expected_sha256}, actual {actual}; "
            f"the file changed after export; re-run `make export RUN={path.parent.name}`"
        )


def read_manifest(artifact_dir: str | os.PathLike) -> dict:
    """Parse ``<artifact_dir>/manifest.json`` and check the fields the loader relies on."""
    path = Path(artifact_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; export the run first: `make export RUN={Path(artifact_dir).name}`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run `make export`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a format-{MANIFEST_FORMAT} export manifest; re-run `make export`")
    missing = [k for k in ("name", "version", "contract", "default_variant", "variants") if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}; re-run `make export`")
    return manifest


class Runner:
    """One loaded variant: ``runner(pixels)`` with ``pixels`` (N, C, H, W) uint8 -> (N, K) float32 logits;
    ``runner.infer(pixels)`` -> (logits, out-of-distribution scores (N,) or None)."""

    def __init__(
        self,
        variant: str,
        runtime: str,
        precision: str,
        device: str,
        contract: Contract,
        manifest: dict,
        predict,
        detector: Detector | None = None,
    ) -> None:
        self.variant, self.runtime, self.precision, self.device = variant, runtime, precision, device
        self.contract, self.manifest = contract, manifest
        self._predict = predict  # (N, C, H, W) uint8 -> (logits, features or None)
        self.detector = detector
        self.reference_check: dict | None = None  # set by load_checked_variant

    def outputs(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, K) float32 logits and (N, D) float32 features (None for a graph exported without them)."""
        c = self.contract
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
            raise ValueError(
                f"{self.variant} takes a uint8 numpy array, got {getattr(pixels, 'dtype', type(pixels).__name__)}"
            )
        if pixels.ndim != 4 or pixels.shape[1:] != c.input_shape or pixels.shape[0] < 1:
            raise ValueError(
                f"{self.variant} takes (N, {c.channels}, {c.height}, {c.width}) pixels (NCHW), got {pixels.shape}"
            )
        return self._predict(np.ascontiguousarray(pixels))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.outputs(pixels)[0]

    def infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, K) logits and (N,) out-of-distribution scores: the one place a score is computed
        (export's measurements, the reference check and the server all call this). Scores are None
        without a detector."""
        logits, features = self.outputs(pixels)
        if self.detector is None:
            return logits, None
        return logits, self.detector.score(logits, features)

    def __repr__(self) -> str:
        return (
            f"Runner({self.manifest.get('name')!r} {self.variant} on {self.device}, "
            f"version {self.manifest.get('version')})"
        )


def load_variant(
    artifact_dir: str | os.PathLike, variant: str | None = None, device: str = "cpu", threads: int | None = None
) -> Runner:
    """Verify and load one variant of an exported run.

    Args:
        artifact_dir: ``artifacts/<RUN>/`` holding ``manifest.json`` and the variant files.
        variant: one of ``VARIANTS``; None picks ``manifest["default_variant"][device type]``.
        device: "cpu", "cuda" or "cuda:N".
        threads: intra-op threads (ORT ``intra_op_num_threads``; ``torch.set_num_threads`` for
            TorchScript, which is process-wide). None leaves the runtime's default.
    Returns:
        a ``Runner``.
    Raises:
        IntegrityError: the file is missing or its sha256 differs from the manifest.
        ValueError: unknown variant, or a variant that cannot run on ``device``.
    """
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    device_type = device.split(":")[0]
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if variant is None:
        variant = manifest["default_variant"].get(device_type)
        if variant is None:
            raise ValueError(
                f"{artifact_dir / MANIFEST_NAME} names no default variant for {device_type}; "
                f"pass a variant, one of {sorted(manifest['variants'])}"
            )
    if variant not in manifest["variants"]:
        known = sorted(manifest["variants"])
        why = manifest.get("rejected", {}).get(variant, {}).get("reason")
        raise ValueError(
            f"variant {variant!r} is not in {artifact_dir / MANIFEST_NAME}"
            + (f" (export rejected it: {why})" if why else "")
            + f"; choose one of {known}"
        )
    entry = manifest["variants"][variant]
    if device_type not in entry.get("devices", ["cpu"]):
        raise ValueError(
            f"variant {variant} runs on {entry.get('devices')} only, not {device}; "
            f"pick another variant for {device_type} (e.g. onnx-fp32)"
        )
    path = artifact_dir / entry["file"]
    verify_file(path, entry["sha256"])
    contract = Contract.from_dict(manifest["contract"])
    if entry["runtime"] not in LOADERS:
        raise ValueError(f"variant {variant}: unknown runtime {entry['runtime']!r} in the manifest")
    predict, device = LOADERS[entry["runtime"]](path, device, threads)
    return Runner(
        variant,
        entry["runtime"],
        entry["precision"],
        device,
        contract,
        manifest,
        predict,
        load_ood(artifact_dir, manifest),
    )


def load_ood(artifact_dir: str | os.PathLike, manifest: dict) -> Detector | None:
    """The run's out-of-distribution detector, sha256-checked; None when the manifest has none
    (exported before the detector existed: such a model serves without the ``ood`` flag)."""
    entry = manifest.get("ood")
    if not entry:
        return None
    path = Path(artifact_dir) / entry["file"]
    verify_file(path, entry["sha256"])
    return load_detector(path)


def _load_onnx(path: Path, device: str, threads: int | None):
    import onnxruntime as ort

    device_type = device.split(":")[0]
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device_type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(
                "device cuda asked for, but this onnxruntime has no CUDAExecutionProvider; "
                "install onnxruntime-gpu or use device cpu"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    input_name = session.get_inputs()[0].name

    def predict(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = session.run(None, {input_name: pixels})  # [logits] or [logits, features]
        return (out[0].astype(np.float32, copy=False), out[1].astype(np.float32, copy=False) if len(out) > 1 else None)

    return predict, ("cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu")


def _load_torchscript(path: Path, device: str, threads: int | None):
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():  # deprecated, but TorchScript is what this torch runs INT8 with
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated.*")
        model = torch.jit.load(str(path), map_location=device).eval()

    def predict(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.inference_mode():
            out = model(torch.from_numpy(pixels).to(device))  # logits, or (logits, features)
        if isinstance(out, torch.Tensor):
            return out.float().cpu().numpy(), None
        return out[0].float().cpu().numpy(), out[1].float().cpu().numpy()

    return predict, device


# ---- the reference batch: what every loaded variant must reproduce --------------------------------
REFERENCE_NAME = "reference.npz"


@dataclass(frozen=True)
class Reference:
    """Held-out images as served, their labels and eager fp32's logits, saved at export.

    ``images`` (N, C, H, W) uint8, ``labels`` (N,) int64, ``logits`` (N, K) float32, ``ood_scores``
    (N,) float64: eager fp32's out-of-distribution scores (None: exported without a detector).
    """

    images: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    ood_scores: np.ndarray | None = None


def save_reference(path: str | os.PathLike, ref: Reference) -> None:
    # Any: numpy's stub reads a ** of arrays as possibly its allow_pickle flag
    extra: dict[str, Any] = {} if ref.ood_scores is None else {"ood_scores": ref.ood_scores.astype(np.float64)}
    with open(path, "wb") as f:
        np.savez(f, images=ref.images, labels=ref.labels, logits=ref.logits.astype(np.float32), **extra)


def load_reference(artifact_dir: str | os.PathLike, manifest: dict) -> Reference:
    """The run's reference batch, sha256-checked against the manifest like every variant file."""
    entry = manifest.get("reference")
    if not entry:
        raise ValueError(
            f"{Path(artifact_dir) / MANIFEST_NAME} has no reference batch (exported before "
            f"it existed); re-run `make export RUN={manifest.get('name')}`"
        )
    path = Path(artifact_dir) / entry["file"]
    verify_file(path, entry["sha256"])
    with np.load(path, allow_pickle=False) as z:
        return Reference(
            z["images"], z["labels"].astype(np.int64), z["logits"], z["ood_scores"] if "ood_scores" in z.files else None
        )


def reference_check(
    logits: np.ndarray,
    ref: Reference,
    precision: str,
    gates: dict,
    scores: np.ndarray | None = None,
    threshold: float | None = None,
) -> tuple[dict, str | None]:
    """A variant's logits (and out-of-distribution scores) on the reference batch against the
    export's gates.

    fp32: the same top-1 as eager fp32 on every image and logits within ``fp32_atol``; INT8: accuracy
    at most ``int8_max_drop_points`` below eager fp32's on the batch. With a detector (``scores``
    and its ``threshold``): fp32 scores within ``ood_fp32_atol`` of eager's; INT8 flags differing
    from eager's on at most ``ood_int8_max_flag_change_points`` of the images (the same budget as
    its accuracy: INT8 moves scores by a few % of the threshold, see export.ood.FP32_SCORE_RTOL).
    Returns (the numbers, why it fails or None).
    """
    top1, ref_top1 = logits.argmax(axis=1), ref.logits.argmax(axis=1)
    numbers = {
        "samples": len(ref.labels),
        "top1_agreement": float((top1 == ref_top1).mean()),
        "max_abs_diff": float(np.abs(logits.astype(np.float64) - ref.logits).max()),
        "accuracy": float((top1 == ref.labels).mean()),
        "reference_accuracy": float((ref_top1 == ref.labels).mean()),
    }
    numbers["drop_points"] = (numbers["reference_accuracy"] - numbers["accuracy"]) * 100.0
    if scores is not None and ref.ood_scores is not None and "ood_fp32_atol" in gates:
        numbers["ood_max_score_diff"] = float(np.abs(scores.astype(np.float64) - ref.ood_scores).max())
        numbers["ood_flag_change_points"] = float(((scores > threshold) != (ref.ood_scores > threshold)).mean() * 100.0)
        if precision == "fp32" and numbers["ood_max_score_diff"] > gates["ood_fp32_atol"]:
            return numbers, (
                f"out-of-distribution score differs from eager fp32's by up to "
                f"{numbers['ood_max_score_diff']:.3g} (allowed {gates['ood_fp32_atol']:.3g}) on "
                f"{numbers['samples']} reference images"
            )
        allowed = gates["ood_int8_max_flag_change_points"]
        if precision != "fp32" and numbers["ood_flag_change_points"] > allowed + 1e-9:
            return numbers, (
                f"out-of-distribution flag differs from eager fp32's on "
                f"{numbers['ood_flag_change_points']:.2f} % of {numbers['samples']} reference "
                f"images (allowed {allowed:g} points)"
            )
    if precision == "fp32":
        if numbers["top1_agreement"] < gates["fp32_top1_agreement"] or numbers["max_abs_diff"] > gates["fp32_atol"]:
            return numbers, (
                f"top-1 agreement {numbers['top1_agreement']:.4f} (need "
                f"{gates['fp32_top1_agreement']:g}), max |logit diff| {numbers['max_abs_diff']:.3g} "
                f"(allowed {gates['fp32_atol']:g}) on {numbers['samples']} reference images"
            )
    # a little slack for float rounding: 0.98 - 0.97 is 1.0000000000000009 points, not over a 1-point gate
    elif numbers["drop_points"] > gates["int8_max_drop_points"] + 1e-9:
        return numbers, (
            f"accuracy {numbers['accuracy']:.4f} is {numbers['drop_points']:.2f} points below eager "
            f"fp32 {numbers['reference_accuracy']:.4f} (allowed {gates['int8_max_drop_points']:g}), "
            f"top-1 agreement {numbers['top1_agreement']:.4f} on {numbers['samples']} reference images"
        )
    return numbers, None


def load_checked_variant(
    artifact_dir: str | os.PathLike,
    variant: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    on_failure=None,
) -> Runner:
    """``load_variant``, then the reference check on this machine before the variant takes traffic.

    A variant outside the export's gates on the reference batch (another CPU's INT8 kernels, a GPU's
    TF32, a broken runtime) is reported to ``on_failure(variant, device, numbers, reason)`` and the
    next variant present in ``artifact_dir`` is tried, INT8 before fp32 (fp32 last). The returned
    runner's ``reference_check`` holds its numbers.

    Raises:
        SelfCheckError: no variant present passes; the message names each one's numbers.
        IntegrityError, ValueError: as ``load_variant``; the reference file is hash-checked too.
    """
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    ref = load_reference(artifact_dir, manifest)
    runner = load_variant(artifact_dir, variant, device, threads)
    device_type = device.split(":")[0]
    fallbacks = sorted(
        (
            v
            for v, e in manifest["variants"].items()
            if v != runner.variant and device_type in e.get("devices", ["cpu"]) and (artifact_dir / e["file"]).is_file()
        ),
        key=lambda v: manifest["variants"][v]["precision"] == "fp32",
    )
    failures = []
    while True:
        logits, scores = runner.infer(ref.images)
        numbers, why = reference_check(
            logits,
            ref,
            runner.precision,
            manifest["gates"],
            scores,
            None if runner.detector is None else runner.detector.threshold,
        )
        if why is None:
            runner.reference_check = numbers
            return runner
        failures.append(f"{runner.variant} on {runner.device}: {why}")
        if on_failure is not None:
            on_failure(runner.variant, runner.device, numbers, why)
        if not fallbacks:
            raise SelfCheckError(
                f"no variant of {manifest.get('name')!r} in {artifact_dir} reproduces the "
                f"export's answers on this machine: "
                + "; ".join(failures)
                + " -- re-export on this hardware or pack an fp32 variant"
            )
        runner = load_variant(artifact_dir, fallbacks.pop(0), device, threads)


# runtime name (``Variant.runtime``) -> load(path, device, threads) -> (predict, device it runs on)
LOADERS = {"onnxruntime": _load_onnx, "torchscript": _load_torchscript}
