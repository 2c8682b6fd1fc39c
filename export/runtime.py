"""Load an exported model variant from ``artifacts/<RUN>/`` and run it: the one loader that export's
parity checks, the tests and the server all use.

Every variant file is checked against the sha256 recorded in ``manifest.json`` before it is loaded, so
a server can never run bytes that differ from what export verified. Exported graphs take uint8 NCHW
pixels and normalise inside the graph; a ``Runner`` maps ``(N, C, H, W) uint8`` to ``(N, K) float32``
logits whatever the runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from export import registry
from training.contract import Contract

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
DEVICE_TYPES = ("cpu", "cuda")
VARIANTS = registry.VARIANTS  # the built-in variant names (export.registry is the table)


class IntegrityError(RuntimeError):
    """An artifact file is missing or its sha256 differs from the manifest's."""


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
        raise IntegrityError(f"{path}: file missing (expected sha256 {expected_sha256}); "
                             f"re-run `make export RUN={path.parent.name}`")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise IntegrityError(f"{path}: sha256 mismatch: expected {expected_sha256}, actual {actual}; "
                             f"the file changed after export; re-run `make export RUN={path.parent.name}`")


def read_manifest(artifact_dir: str | os.PathLike) -> dict:
    """Parse ``<artifact_dir>/manifest.json`` and check the fields the loader relies on."""
    path = Path(artifact_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; export the run first: "
                                f"`make export RUN={Path(artifact_dir).name}`")
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
    """One loaded variant: ``runner(pixels)`` with ``pixels`` (N, C, H, W) uint8 -> (N, K) float32 logits."""

    def __init__(self, variant: str, runtime: str, precision: str, device: str, contract: Contract,
                 manifest: dict, predict) -> None:
        self.variant, self.runtime, self.precision, self.device = variant, runtime, precision, device
        self.contract, self.manifest = contract, manifest
        self._predict = predict

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        c = self.contract
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
            raise ValueError(f"{self.variant} takes a uint8 numpy array, got "
                             f"{getattr(pixels, 'dtype', type(pixels).__name__)}")
        if pixels.ndim != 4 or pixels.shape[1:] != c.input_shape or pixels.shape[0] < 1:
            raise ValueError(f"{self.variant} takes (N, {c.channels}, {c.height}, {c.width}) pixels "
                             f"(NCHW), got {pixels.shape}")
        return self._predict(np.ascontiguousarray(pixels))

    def __repr__(self) -> str:
        return (f"Runner({self.manifest.get('name')!r} {self.variant} on {self.device}, "
                f"version {self.manifest.get('version')})")


def load_variant(artifact_dir: str | os.PathLike, variant: str | None = None, device: str = "cpu",
                 threads: int | None = None) -> Runner:
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
            raise ValueError(f"{artifact_dir / MANIFEST_NAME} names no default variant for {device_type}; "
                             f"pass a variant, one of {sorted(manifest['variants'])}")
    if variant not in manifest["variants"]:
        known = sorted(manifest["variants"])
        why = manifest.get("rejected", {}).get(variant, {}).get("reason")
        raise ValueError(f"variant {variant!r} is not in {artifact_dir / MANIFEST_NAME}"
                         + (f" (export rejected it: {why})" if why else "") + f"; choose one of {known}")
    entry = manifest["variants"][variant]
    if device_type not in entry.get("devices", ["cpu"]):
        raise ValueError(f"variant {variant} runs on {entry.get('devices')} only, not {device}; "
                         f"pick another variant for {device_type} (e.g. onnx-fp32)")
    path = artifact_dir / entry["file"]
    verify_file(path, entry["sha256"])
    contract = Contract.from_dict(manifest["contract"])
    if entry["runtime"] not in LOADERS:
        raise ValueError(f"variant {variant}: unknown runtime {entry['runtime']!r} in the manifest")
    predict, device = LOADERS[entry["runtime"]](path, device, threads)
    return Runner(variant, entry["runtime"], entry["precision"], device, contract, manifest, predict)


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
            raise ValueError("device cuda asked for, but this onnxruntime has no CUDAExecutionProvider; "
                             "install onnxruntime-gpu or use device cpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    input_name = session.get_inputs()[0].name

    def predict(pixels: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: pixels})[0].astype(np.float32, copy=False)

    return predict, ("cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu")


def _load_torchscript(path: Path, device: str, threads: int | None):
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():  # deprecated, but TorchScript is what this torch runs INT8 with
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated.*")
        model = torch.jit.load(str(path), map_location=device).eval()

    def predict(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(pixels).to(device))
        return out.float().cpu().numpy()

    return predict, device


# runtime name (``Variant.runtime``) -> load(path, device, threads) -> (predict, device it runs on)
LOADERS = {"onnxruntime": _load_onnx, "torchscript": _load_torchscript}
