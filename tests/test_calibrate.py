"""Temperature scaling (export.calibrate) and the one place served probabilities use it (serving.core.top_k)."""

from __future__ import annotations

import numpy as np
import pytest

from export.calibrate import T_RANGE, ece, fit_temperature, nll
from serving.core import top_k


def synthetic(n: int = 20000, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is calibrated by construction: each label is drawn from softmax(logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n, k))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_a_known_temperature(true_t):
    logits, labels = synthetic()
    skewed = logits * true_t  # a model whose logits are T times too large (over-confident for T > 1)
    t = fit_temperature(skewed, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    assert ece(skewed, labels, t) < ece(skewed, labels) / 2
    assert nll(skewed, labels, t) < nll(skewed, labels)


def test_the_prior_shrinks_a_small_split_toward_1_and_leaves_a_large_one_alone():
    """144 validation images all right: the plain fit runs to the bottom of T_RANGE, the prior keeps T
    inside it. On any split the prior only shrinks log T toward 0; on 20,000 images it hardly moves."""
    logits, _ = synthetic(144, seed=3)
    right = logits.argmax(1)  # every label predicted correctly
    assert fit_temperature(logits, right, prior_sigma=None) == pytest.approx(T_RANGE[0], rel=0.01)
    assert fit_temperature(logits, right) > 1.5 * T_RANGE[0]
    for seed in range(5):
        logits, labels = synthetic(144, seed=seed)
        mle, fitted = (np.log(fit_temperature(logits * 2.0, labels, prior_sigma=s)) for s in (None, 0.5))
        assert abs(fitted) <= abs(mle) + 1e-9 and np.sign(fitted) == np.sign(mle)
    logits, labels = synthetic()
    skewed = logits * 2.5
    assert fit_temperature(skewed, labels) == pytest.approx(fit_temperature(skewed, labels, prior_sigma=None),
                                                            rel=0.01)


def test_fit_stays_in_range_and_needs_data():
    logits, labels = synthetic(2000)
    assert T_RANGE[0] < fit_temperature(logits, labels) < T_RANGE[1]
    with pytest.raises(ValueError, match="at least one"):
        fit_temperature(logits[:0], labels[:0])


def test_ece_of_a_perfectly_calibrated_bin_is_zero_and_of_a_wrong_sure_model_is_one():
    sure = np.array([[100.0, 0.0], [0.0, 100.0]])
    assert ece(sure, np.array([0, 1])) == pytest.approx(0.0, abs=1e-9)
    assert ece(sure, np.array([1, 0])) == pytest.approx(1.0, abs=1e-9)


def test_tempered_probabilities_sum_to_one_and_keep_the_argmax():
    logits, _ = synthetic(200)
    names = [str(i) for i in range(10)]
    plain, tempered = top_k(logits, 10, names), top_k(logits, 10, names, temperature=2.5)
    for a, b in zip(plain, tempered):
        assert sum(c["probability"] for c in b) == pytest.approx(1.0, abs=1e-5)
        assert [c["index"] for c in a] == [c["index"] for c in b]  # the order is unchanged
        assert b[0]["probability"] < a[0]["probability"]  # T > 1: less sure
