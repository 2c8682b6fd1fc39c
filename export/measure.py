"""Numbers export records for each variant: parity against eager, held-out accuracy, latency.

Every function takes a ``predict`` callable ``(N, C, H, W) uint8 numpy -> (N, K) float32 numpy`` so the
eager model and every loaded ``Runner`` are measured by the same code.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from training.contract import Contract, WithPreprocessing

Predict = Callable[[np.ndarray], np.ndarray]


def eager_predict(model: nn.Module, contract: Contract, device: str = "cpu") -> Predict:
    """The trained model in eager PyTorch, on uint8 pixels: the reference every variant is held to.
    On ``device`` (host-device copies included, as a server pays them)."""
    wrapped = WithPreprocessing(model, contract).eval().to(device)

    def predict(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return wrapped(torch.from_numpy(pixels).to(device)).float().cpu().numpy()

    return predict


def predict_all(predict: Predict, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits (N, K) for all images, in batches."""
    return np.concatenate([predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def parity(reference: np.ndarray, logits: np.ndarray) -> dict:
    """How closely ``logits`` follow the eager ``reference`` on the same images."""
    return {
        "samples": len(reference),
        "top1_agreement": float((reference.argmax(1) == logits.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(reference - logits).max()),
        "mean_abs_diff": float(np.abs(reference - logits).mean()),
    }


def latency(
    predicts: dict[str, Predict],
    contract: Contract,
    rounds: int = 20,
    batch1_runs: int = 10,
    batch64_runs: int = 1,
    seed: int = 0,
    big_batch: int = 64,
) -> dict[str, dict]:
    """p50 latency at batch 1 and images/s at batch ``big_batch`` (64) for several predictors, measured
    side by side.

    The predictors take turns within each round, so background load on a shared machine hits all of
    them alike and their ratios stay meaningful. Medians, not means, for the same reason.

    Returns:
        {name: {"batch1_p50_ms": float, "batch64_p50_ms": float, "batch64_images_per_s": float}}
        (64 in the keys is ``big_batch``.)
    """
    rng = np.random.default_rng(seed)
    one = rng.integers(0, 256, (1, *contract.input_shape), dtype=np.uint8)
    many = rng.integers(0, 256, (big_batch, *contract.input_shape), dtype=np.uint8)
    for predict in predicts.values():  # warm-up: first calls allocate and pick kernels
        for _ in range(3):
            predict(one)
        predict(many)
    b1: dict[str, list[float]] = {name: [] for name in predicts}
    b64: dict[str, list[float]] = {name: [] for name in predicts}
    for _ in range(rounds):
        for name, predict in predicts.items():
            for _ in range(batch1_runs):
                t0 = time.perf_counter()
                predict(one)
                b1[name].append(time.perf_counter() - t0)
            for _ in range(batch64_runs):
                t0 = time.perf_counter()
                predict(many)
                b64[name].append(time.perf_counter() - t0)
    out = {}
    for name in predicts:
        p50_64 = statistics.median(b64[name])
        out[name] = {
            "batch1_p50_ms": round(statistics.median(b1[name]) * 1e3, 4),
            f"batch{big_batch}_p50_ms": round(p50_64 * 1e3, 3),
            f"batch{big_batch}_images_per_s": round(big_batch / p50_64, 1),
        }
    return out
