"""bench/bench_train.py's report logic: the curve, the verdicts, the step ceiling (tiny, CPU)."""

import importlib.util
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench/bench_train.py")
bench = sys.modules["bench_train"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(bench)


def _result(accs, seconds=40.0):
    history = [{"epoch": i + 1, "seconds": seconds, "val_accuracy": a, "images_per_s": 2000.0 + i}
               for i, a in enumerate(accs)]
    return bench.TrainResult(["--model", "bn_cnn"], 170.0, history,
                             {"train_seconds": seconds * len(accs), "test_accuracy": accs[-1], "test_samples": 360})


def test_curve_is_cumulative_and_time_to_first_crossing():
    rows = bench.curve(_result([0.8, 0.921, 0.93]).history)
    assert [r[1] for r in rows] == [40.0, 80.0, 120.0]
    assert bench.time_to(rows, 0.92) == 80.0 and bench.time_to(rows, 0.95) is None


@pytest.mark.parametrize("accs, seconds, verdict", [
    ([0.85, 0.90, 0.925], 50.0, "met: 92% first reached after 150 s (epoch 3)"),
    ([0.85, 0.90, 0.91, 0.93], 50.0, "MISSED: the best epoch within 180 s reached 0.9100"),  # 4th at 200 s
    ([0.95], 200.0, "MISSED: no epoch finished within 180 s"),
])
def test_fashion_verdict(accs, seconds, verdict):
    assert verdict in bench.fashion_section(_result(accs, seconds), None, "machine")


def test_demo_verdict_uses_medians():
    fast_good = [_result([0.98], 20.0), _result([0.99], 21.0), _result([0.5], 90.0)]
    assert "Target < 60 s and >= 97%: met" in bench.demo_section(fast_good, "machine")
    slow = [_result([0.98], 70.0)] * 3
    assert "MISSED" in bench.demo_section(slow, "machine")


def test_step_rates_measure_every_setting():
    rates = bench.step_rates(["lenet"], batch_size=4, rounds=2, channels=3, size=32)
    assert [(m, p, cl) for m, p, cl, _ in rates] == [
        ("lenet", "fp32", False), ("lenet", "fp32", True), ("lenet", "bf16", False), ("lenet", "bf16", True)]
    assert all(ips > 0 for *_, ips in rates)
