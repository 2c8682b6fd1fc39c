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
    assert bench.time_to(rows, bench.FASHION_TARGET_ACC) == 120.0


@pytest.mark.parametrize("accs, seconds, verdict", [
    ([0.85, 0.90, 0.935], 50.0, "met: 93% first reached after 150 s (epoch 3)"),
    ([0.85, 0.90, 0.91, 0.94], 50.0, "MISSED: the best epoch within 180 s reached 0.9100"),  # 4th at 200 s
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


def test_ratio_section_uses_per_round_ratios():
    res = bench.RatioResult({"tensor": [900.0, 950.0, 400.0], "loader": [500.0, 520.0, 200.0],
                             "ceiling": [1000.0, 1000.0, 420.0]}, [0.9, 0.95, 400 / 420],
                            {"model": "bn_cnn", "batch_size": 128, "precision": "bf16", "channels_last": True,
                             "augment": "crop-flip", "rounds": 3, "steps": 5, "loader_workers": 1, "device": "cpu"})
    text = bench.ratio_section(res, "machine")
    assert "tensor **0.95**" in text and "DataLoader 0.50" in text and "Target >= 0.90: met" in text
    assert text.count("\n| ") == 4  # header + 3 rounds


def test_subsample_files_and_report(tmp_path):
    import gzip

    from datafiles import write_mnist_gz
    src = write_mnist_gz(tmp_path / "src", n_train=50, n_test=10)
    out = bench.write_subsample(src, tmp_path / "sub", 20)
    raw = gzip.open(out / "train-images-idx3-ubyte.gz").read()
    labels = gzip.open(out / "train-labels-idx1-ubyte.gz").read()
    assert raw[:8] == b"\x00\x00\x08\x03" + (20).to_bytes(4, "big") and len(raw) == 16 + 20 * 784
    assert labels[4:8] == (20).to_bytes(4, "big") and len(labels) == 8 + 20
    assert gzip.open(out / "t10k-images-idx3-ubyte.gz").read() == gzip.open(src / "t10k-images-idx3-ubyte.gz").read()
    res = {k: bench.TrainResult(["--epochs", e], 1.0, [{"epoch": 1, "seconds": 1.0, "val_accuracy": a, "images_per_s": 1.0}],
                                {"train_seconds": 1.0}) for k, e, a in
           (("4 epochs", "4", 0.845), ("30 epochs", "30", 0.85), ("4 epochs, no step floor", "4", 0.80))}
    assert "(-0.50 points). Target within ~1 point: met" in bench.subsample_section(res, 20, "m")


def test_json_report_merges(tmp_path):
    path = tmp_path / "r.json"
    bench.update_json(path, {"a": 1, "b": 2})
    bench.update_json(path, {"b": 3})
    import json
    assert json.loads(path.read_text()) == {"a": 1, "b": 3}
