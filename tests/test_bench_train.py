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
    assert verdict in bench.fashion_section(_result(accs, seconds), None, "machine", 4000.0)


def test_fashion_section_gives_time_to_each_target_and_the_ceiling():
    text = bench.fashion_section(_result([0.905, 0.921, 0.935]), None, "machine", 4000.0)
    assert "90% after 40 s, 92% after 80 s, 93% after 120 s, 94% not reached" in text
    assert "Trainer 2,001 images/s against a step ceiling of 4,000 images/s" in text and "(0.50)" in text


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


def test_ratio_section_uses_per_round_cpu_ratios():
    wall = {"tensor": [90.0, 95.0, 40.0], "loader": [50.0, 52.0, 20.0], "ceiling": [100.0, 100.0, 42.0]}
    cpu = {k + "_cpu": [v * 10 for v in vs] for k, vs in wall.items()}
    res = bench.RatioResult({**wall, **cpu}, [0.9, 0.95, 40 / 42],
                            {"model": "bn_cnn", "batch_size": 128, "precision": "bf16", "channels_last": True,
                             "augment": "crop-flip", "rounds": 3, "steps": 5, "loader_workers": 0, "device": "cpu"})
    text = bench.ratio_section(res, "machine")
    assert "tensor **0.950**" in text and "DataLoader 0.500" in text and "Target >= 0.90: met" in text
    assert text.count("\n| ") == 4  # header + 3 rounds


def test_ratio_runs_the_trainer_and_the_ceiling(tmp_path, monkeypatch):
    from training.datafiles import write_mnist_gz
    monkeypatch.chdir(tmp_path)  # IDX staging goes to ./data
    data = write_mnist_gz(tmp_path / "f", n_train=64, n_test=8)
    res = bench.trainer_vs_ceiling(data, model_name="simple_cnn", batch_size=8, precision="fp32",
                                   channels_last=False, rounds=2, steps=3)
    assert all(len(v) == 2 and min(v) > 0 for v in res.rates.values()) and len(res.ratios) == 2


def test_subsample_files_and_report(tmp_path):
    import gzip

    from training.datafiles import write_mnist_gz
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


def test_demo_refuses_a_run_name_instead_of_dropping_it(tmp_path):
    with pytest.raises(SystemExit, match="--demo-args names --run; leave it out"):
        bench.main(["demo", "--demo-args", "--run digits --epochs 1", "--runs-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before any training


def test_one_writer_for_every_subcommand(tmp_path, capsys):
    assert set(bench.SUBCOMMANDS) == {"fashion", "demo", "steps", "ratio", "subsample"}
    docs, report = tmp_path / "bench.md", tmp_path / "r.json"
    bench.write_report(bench.Report("k", "## section", {"x": 1}), "demo", docs, report, 0.5)
    assert "<!-- k:begin -->\n## section\n<!-- k:end -->" in docs.read_text()
    import json
    doc = json.loads(report.read_text())
    assert doc["x"] == 1 and doc["demo_load_average"][0] == 0.5 and "demo_measured" in doc
    assert bench.main(["steps", "--models", "lenet", "--batch-size", "4", "--rounds", "1", "--channels", "3",
                       "--size", "32", "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert "<!-- bench-train-steps:begin -->" in text and "<!-- k:begin -->" in text  # sections side by side
    assert bench.cpu_name() in capsys.readouterr().out  # the report names the machine it ran on
