"""bench/sweep_train.py and bench/gpu_cifar_recipe.py: the report logic, the ceiling of a configuration,
reuse of finished runs, and the GPU script's smoke on the CPU."""

import json
import statistics

import pytest

from bench import gpu_cifar_recipe, sweep_train
from bench.bench_train import config_ceiling


def _run(config, seed, accs, seconds=50.0, command=None):
    curve = [(i + 1, seconds * (i + 1), a, 1000.0 + i) for i, a in enumerate(accs)]
    return sweep_train.SweepRun(config, seed, command or f"python -m training train --seed {seed}", curve, 2000.0,
                                accs[-1], accs[-1] + 0.003, 300.0)


def test_section_reports_time_to_each_target_and_seed_spread():
    name, other = list(sweep_train.CONFIGS)[:2]
    runs = [_run(name, 0, [0.89, 0.921, 0.935]), _run(name, 1, [0.88, 0.92, 0.931]), _run(name, 2, [0.9, 0.93, 0.94]),
            _run(other, 0, [0.85, 0.91])]
    text = sweep_train.section(runs, "machine")
    row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # seeds, final accuracy (mean), TTA (mean), seconds, s to 90/92/93/94, trainer, ceiling, ratio
    assert cells[2:] == ["3", f"{statistics.mean([0.935, 0.931, 0.94]):.4f}",
                         f"{statistics.mean([0.938, 0.934, 0.943]):.4f}", "150", "100", "100", "150", "-",
                         "1,001", "2,000", "0.50"]
    assert (f"- {name}, seeds 0, 1, 2: final test accuracy without TTA 0.9353 mean (0.9310-0.9400), with flip "
            f"TTA 0.9383 (0.9340-0.9430); seconds 150 (150-150); best within 180 s (per-epoch evaluation) 0.9353 "
            f"(0.9310-0.9400)") in text
    assert f"- {other}," not in text  # one seed: no spread to report


def test_config_ceiling_builds_the_configured_step():
    ips = config_ceiling(["--model", "bn_cnn", "--width", "4", "--batch-size", "8", "--label-smoothing", "0.1"],
                         channels=1, size=28, rounds=2, steps=1)
    assert ips > 0
    with pytest.raises(ValueError, match="fixed width"):
        config_ceiling(["--model", "lenet", "--width", "4"], channels=1, size=28, rounds=1, steps=1)


def test_a_finished_run_is_read_back_only_for_the_same_command(tmp_path, monkeypatch):
    name = next(iter(sweep_train.CONFIGS))
    command = ("python -m training train " + " ".join(sweep_train.CONFIGS[name]) + " --dataset fashion-mnist "
               f"--data-dir {tmp_path / 'data'} --val-fraction 0 --seed 3")
    saved = _run(name, 3, [0.9, 0.92], command=command)
    (tmp_path / f"{name}-s3").mkdir()
    (tmp_path / f"{name}-s3" / "sweep.json").write_text(json.dumps(sweep_train.asdict(saved)))
    assert sweep_train.run_config(name, 3, tmp_path / "data", tmp_path, fresh=False) == saved

    def trains(*args, **kwargs):
        raise RuntimeError("trained again")

    monkeypatch.setattr(sweep_train, "config_ceiling", trains)
    with pytest.raises(RuntimeError, match="trained again"):  # the data dir differs: another command
        sweep_train.run_config(name, 3, tmp_path / "other", tmp_path, fresh=False)
    with pytest.raises(RuntimeError, match="trained again"):
        sweep_train.run_config(name, 3, tmp_path / "data", tmp_path, fresh=True)


@pytest.mark.parametrize("args, says", [(["--only", "nope"], "unknown configuration 'nope'"),
                                        (["--seeds", "0,x"], "--seeds takes comma-separated integers, got '0,x'")])
def test_mistakes_are_one_line(args, says, capsys):
    with pytest.raises(SystemExit) as e:
        sweep_train.main(args)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_gpu_recipe_refuses_without_cuda(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_cifar_recipe.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_gpu_recipe_smoke_on_cpu(tmp_path):
    """The one-call GPU script end to end on the CPU (--quick): pattern data, the recipe's ceiling, the
    real trainer, the report."""
    assert gpu_cifar_recipe.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path), "--device", "cpu",
                                  "--quick"]) == 0
    numbers = json.loads((tmp_path / "out" / "gpu_cifar_recipe.json").read_text())
    assert numbers["step_ceiling_images_per_s"] > 0 and numbers["trainer_images_per_s"] > 0
    assert len(numbers["epoch_seconds"]) == 2 and "--model resnet9" in numbers["command"]
    assert "| 2 |" in (tmp_path / "out" / "gpu_cifar_recipe.md").read_text()


def test_tta_serving_cost_exports_both_and_times_them(tmp_path):
    """The cost line compares the same weights exported with and without flip TTA (real ONNX Runtime)."""
    from training.checkpoint import FORMAT_VERSION, save_checkpoint
    from training.contract import Contract
    from training.models import build_model

    contract = Contract(28, 28, 1, (0.3,), (0.35,), tuple("abcdefghij"))
    model = build_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=4)
    save_checkpoint({"format": FORMAT_VERSION, "arch": "resnet8", "arch_args": {"in_channels": 1, "num_classes": 10, "image_size": 28,
                                                      "width": 4},
                     "contract": contract.to_dict(), "state_dict": model.state_dict()}, tmp_path / "last.pt")
    cost = sweep_train.tta_serving_cost(tmp_path / "last.pt", rounds=2)
    assert set(cost) == {"onnx-fp32", "onnx-fp32 + flip TTA"}
    assert all(c["batch1_p50_ms"] > 0 and c["batch64_images_per_s"] > 0 for c in cost.values())
    assert "batch-1 p50" in sweep_train.tta_cost_line("r8", cost)


def test_the_makefiles_fashion_recipe_is_the_sweeps_choice():
    """make train RUN=fashion (and make bench-train) run the configuration the sweep chose; --precision
    auto is fp32 on the sweep's AVX2 machine, so that one setting may differ."""
    import inspect
    import re
    import subprocess

    from training.config import parse_train_args
    from training.data import DATASETS
    from training.models import MODELS

    out = subprocess.run(["make", "--no-print-directory", "-n", "train", "RUN=fashion", "DATA_DIR=/d"],
                         capture_output=True, text=True, cwd=sweep_train.REPO, check=True).stdout
    line = next(ln for ln in re.sub(r"\s*\\\n\s*", " ", out).splitlines() if "-m training train " in ln)
    argv = line.split("-m training train ", 1)[1].split()
    made = parse_train_args([a for a in argv if a not in ("--run", "fashion")])
    default_width = inspect.signature(MODELS[made.model].builder).parameters["width"].default
    default_augment = DATASETS[made.dataset].default_augment
    chosen = parse_train_args([*sweep_train.CONFIGS[sweep_train.RECIPE], "--dataset", "fashion-mnist",
                               "--data-dir", "/d"])
    assert made.precision == "auto"
    defaults = {"precision": "fp32", "width": default_width, "augment": default_augment}
    assert sweep_train.asdict(made) | defaults == sweep_train.asdict(chosen)
