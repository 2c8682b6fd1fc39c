"""Out-of-distribution detection: how far an input is from the training data, fitted at export.

A classifier answers every input with some class; a photo posted to the digits model comes back "7" at
0.6. The detector gives each image a score (higher = less like the training data) and a flag (score
above a threshold). It is fitted at export on the model's own penultimate features and shipped with the
artifact (``ood.npz``, sha256 in the manifest):

- every exported graph has a second output, ``features``: the input of the model's last linear layer
  (``with_features``), so TorchScript, ONNX and both INT8 variants give the features their own
  runtime computes, with the normalisation inside the graph as before;
- the score is computed from (logits, features) by ``Detector.score``, in numpy, in one place: the
  loaded ``export.runtime.Runner`` calls it, and export's measurements, the reference self-check and
  the server all go through that runner;
- the threshold is the ``acceptance`` quantile (default 95 %) of the scores of the checkpoint's
  validation split (never the test split): about 5 % of in-distribution images are flagged, by design.

Methods (``METHODS``; bench/bench_ood.py compares them, docs/export.md has the table):
  msp        1 - the top calibrated softmax probability (Hendrycks & Gimpel 2017): the baseline;
  energy     -T log sum exp(logits / T) (Liu et al. 2020);
  mahalanobis  min over classes of the Mahalanobis distance to the class mean, one shared covariance
             (Lee et al. 2018), Ledoit-Wolf shrinkage (a few hundred images for 128 dimensions);
  mahalanobis-normalised  the same on L2-normalised features (the default: best measured on the demo
             digits and Fashion-MNIST models);
  knn        1 - cosine similarity to the k-th nearest training feature (Sun et al. 2022).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

OOD_NAME = "ood.npz"
METHODS = ("msp", "energy", "mahalanobis", "mahalanobis-normalised", "knn")
DEFAULT_METHOD = "mahalanobis-normalised"
FEATURES_NAME = "features"  # the second output of every exported graph
DEFAULT_ACCEPTANCE = 0.95  # share of in-distribution (validation) images the threshold accepts
DEFAULT_KNN_K = 1  # k of knn: 1 measured best with ~1,300 training digits (bench/bench_ood.py)
# Scores of one image by two fp32 variants differ by float rounding only: they are gated (at export
# and by every worker's reference self-check, export.runtime.reference_check) within FP32_SCORE_RTOL
# of the threshold, a score's natural unit (measured on the demo digits: 4e-7). INT8 moves them by
# the quantisation of the features (measured: up to 0.024 of the threshold, both INT8 variants, the
# manifest records it per variant); INT8 is gated on the flag, the answer a client acts on: it may
# change the flag of at most as many points of images as it may lose accuracy points.
FP32_SCORE_RTOL = 1e-3
_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# the graph's second output
# --------------------------------------------------------------------------------------------------
def with_features(model):
    """``model`` -> a module returning ``(logits, features)``: the features are the input of its last
    ``nn.Linear`` (the classifier head), for every architecture in ``training.models``.

    torch.fx rewrites the traced graph's output; the model itself is not changed and the logits are
    computed by the same operations. Raises ValueError for a model without a final linear layer.
    """
    from torch import fx, nn

    graph_module = fx.symbolic_trace(model)
    modules = dict(graph_module.named_modules())
    linears = [
        n for n in graph_module.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Linear)
    ]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer; the out-of-distribution "
            f"detector reads the input of the last one"
        )
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    output.args = ((output.args[0], linears[-1].args[0]),)
    graph_module.recompile()
    return graph_module.eval()


# --------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------
def _log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _normalise(features: np.ndarray) -> np.ndarray:
    f = features.astype(np.float64)
    f *= 1.0 / (np.sqrt((f * f).sum(axis=1, keepdims=True)) + _EPS)
    return f


@dataclass(frozen=True)
class Detector:
    """A fitted detector: ``score(logits, features)`` -> (N,) float64, higher = less like training.

    Attributes:
        method: one of ``METHODS``.
        threshold: scores above it are flagged out of distribution.
        temperature: the served probabilities' temperature (msp and energy use it).
        arrays: what the method needs: ``means`` (K, D) and ``precision`` (D, D) for the Mahalanobis
            methods, ``bank`` (M, D) L2-normalised training features for knn; none for msp/energy.
        k: the neighbour knn uses.
    """

    method: str
    threshold: float = float("inf")
    temperature: float = 1.0
    arrays: dict = field(default_factory=dict)
    k: int = DEFAULT_KNN_K

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown out-of-distribution method {self.method!r}; choose one of {METHODS}")

    @property
    def needs_features(self) -> bool:
        return self.method not in ("msp", "energy")

    def score(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """(N, K) logits and (N, D) features of the same images -> (N,) scores."""
        if self.method == "msp":
            return 1.0 - np.exp(_log_softmax(logits, self.temperature).max(axis=1))
        if self.method == "energy":
            z = logits.astype(np.float64) / self.temperature
            m = z.max(axis=1)
            return -self.temperature * (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))
        if features is None:
            raise ValueError(
                f"method {self.method} needs the graph's features output; this variant has "
                f"none (exported before the detector existed): re-run make export"
            )
        if self.method == "knn":
            similarity = _normalise(features) @ self.arrays["bank"].T  # (N, M)
            k = min(self.k, similarity.shape[1])
            return 1.0 - np.partition(similarity, -k, axis=1)[:, -k]
        f = _normalise(features) if self.method == "mahalanobis-normalised" else features.astype(np.float64)
        # (f - mu)' P (f - mu) for every class at once: f'Pf - 2 f'P mu + mu'P mu, (N, K), with one
        # matrix product (few numpy calls: at batch 1 their overhead is most of the cost)
        dim = f.shape[1]
        z = f @ self._projection  # (N, D + K): f'P and -2 f'P mu
        d = (z[:, :dim] * f).sum(axis=1, keepdims=True) + z[:, dim:] + self.arrays["mean_terms"]
        return np.maximum(d.min(axis=1), 0.0)

    @cached_property
    def _projection(self) -> np.ndarray:
        """[P | -2 P mu'] (D, D + K) of the Mahalanobis methods."""
        precision = self.arrays["precision"]
        return np.ascontiguousarray(np.concatenate([precision, -2.0 * precision @ self.arrays["means"].T], axis=1))

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return scores > self.threshold

    def with_threshold(self, threshold: float) -> Detector:
        return Detector(self.method, float(threshold), self.temperature, self.arrays, self.k)


def fit_detector(
    method: str,
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    temperature: float = 1.0,
    k: int = DEFAULT_KNN_K,
) -> Detector:
    """Fit ``method`` on training features (N, D) and labels (N,); the threshold is set apart
    (``threshold_at``)."""
    if method in ("msp", "energy"):
        return Detector(method, temperature=temperature)
    if method == "knn":
        if k < 1:
            raise ValueError(f"knn needs k >= 1, got {k}")
        return Detector(method, temperature=temperature, k=k, arrays={"bank": _normalise(features).astype(np.float32)})
    if method not in METHODS:
        raise ValueError(f"unknown out-of-distribution method {method!r}; choose one of {METHODS}")
    from sklearn.covariance import ledoit_wolf

    f = _normalise(features) if method == "mahalanobis-normalised" else features.astype(np.float64)
    missing = sorted(set(range(num_classes)) - set(np.unique(labels).tolist()))
    if missing:
        raise ValueError(
            f"Mahalanobis needs training images of every class; classes {missing} have none (raise --ood-fit-size)"
        )
    means = np.stack([f[labels == c].mean(axis=0) for c in range(num_classes)])  # (K, D)
    covariance, _shrinkage = ledoit_wolf(f - means[labels])  # (D, D), shared
    precision = np.linalg.pinv(covariance, hermitian=True)
    precision = (precision + precision.T) / 2
    mean_terms = np.einsum("kd,de,ke->k", means, precision, means)
    return Detector(
        method, temperature=temperature, arrays={"means": means, "precision": precision, "mean_terms": mean_terms}
    )


def threshold_at(scores: np.ndarray, acceptance: float) -> float:
    """The score below which (or at which) ``acceptance`` of ``scores`` lie: the flag's threshold."""
    if not 0.0 < acceptance <= 1.0:
        raise ValueError(f"acceptance must be in (0, 1], got {acceptance}")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), acceptance, method="higher"))


# --------------------------------------------------------------------------------------------------
# file
# --------------------------------------------------------------------------------------------------
def save_detector(path: str | os.PathLike, detector: Detector) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        method=np.array(detector.method),
        threshold=np.float64(detector.threshold),
        temperature=np.float64(detector.temperature),
        k=np.int64(detector.k),
        **{f"array_{name}": a for name, a in detector.arrays.items()},
    )
    Path(path).write_bytes(buf.getvalue())


def load_detector(path: str | os.PathLike) -> Detector:
    with np.load(path, allow_pickle=False) as z:
        arrays = {name[len("array_") :]: z[name] for name in z.files if name.startswith("array_")}
        return Detector(str(z["method"]), float(z["threshold"]), float(z["temperature"]), arrays, int(z["k"]))


# --------------------------------------------------------------------------------------------------
# measurement (export's manifest entry, bench/bench_ood.py)
# --------------------------------------------------------------------------------------------------
def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of telling out- from in-distribution by score (ties count half)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = DEFAULT_ACCEPTANCE) -> float:
    """FPR@95TPR: the share of out-of-distribution images accepted at the threshold that accepts
    ``tpr`` of the in-distribution ones (in-distribution as the positive class, as in the papers)."""
    return float(np.mean(np.asarray(out_scores) <= threshold_at(in_scores, tpr)))
