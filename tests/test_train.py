"""The trainer end to end on tiny data: checkpoints, exact resume, DDP, precision, the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

import training.train as train_mod
from conftest import REPO, train_tiny
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.files import atomic_write_bytes
from training.config import TrainConfig


def test_checkpoint_rebuilds_model_with_contract(digits_checkpoint):
    ckpt = load_checkpoint(digits_checkpoint)  # weights_only=True inside
    model, contract = model_from_checkpoint(ckpt)
    assert contract.input_shape == (1, 28, 28) and contract.num_classes == 10
    assert {"git_commit", "torch", "torchvision", "python"} <= set(ckpt["provenance"])
    assert ckpt["metrics"]["test_samples"] == 360 and 0 <= ckpt["metrics"]["test_accuracy"] <= 1
    run_dir = digits_checkpoint.parent
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "simple_cnn" and config["epochs"] == 2
    last = load_checkpoint(run_dir / "last.pt")
    assert {"optimizer", "scheduler", "scaler", "rng", "history"} <= set(last)
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing


UMASK_AT_IMPORT = os.umask(0o022)
os.umask(UMASK_AT_IMPORT)


def test_atomic_write_keeps_old_file_on_failure_and_plain_permissions(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, lambda f: f.write(b"old"))
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~UMASK_AT_IMPORT)  # not mkstemp's 0600

    def torn(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, torn)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _interrupt_after(epochs_done: int, monkeypatch):
    real = train_mod.train_one_epoch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        if calls["n"] == epochs_done:
            raise KeyboardInterrupt("simulated Ctrl-C")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", flaky)


@pytest.mark.parametrize("pipeline, extra", [
    ("loader", dict(workers=2, min_steps=0)),       # DataLoader worker seeding, PIL augmentation
    ("tensor", dict(min_steps=40, augment="crop-flip")),  # device-side augmentation, 2 passes per epoch
    ("tensor", dict(min_steps=0, augment="flip", model="bn_cnn", width=8, ema_decay=0.9)),  # weight average
])
def test_resume_gives_identical_weights(tmp_path, monkeypatch, pipeline, extra):
    """Seeded run interrupted after epoch 1 and resumed == the uninterrupted run, bit for bit."""
    common = dict(model="simple_cnn", dataset="digits", epochs=2, val_fraction=0.5, lr=3e-3, seed=7,
                  runs_dir=str(tmp_path), batch_size=64, tensorboard=False, pipeline=pipeline)
    common.update(extra)
    train_mod.fit(TrainConfig(run="straight", **common))

    with monkeypatch.context() as m:
        _interrupt_after(1, m)
        with pytest.raises(KeyboardInterrupt):
            train_mod.fit(TrainConfig(run="resumed", **common))
    assert load_checkpoint(tmp_path / "resumed/last.pt")["epoch"] == 1
    train_mod.fit(TrainConfig(run="resumed", resume=True, **common))

    a = load_checkpoint(tmp_path / "straight/last.pt")
    b = load_checkpoint(tmp_path / "resumed/last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["config"]["pipeline"] == pipeline
    for weights in ("state_dict", "train_state_dict") if "ema_decay" in extra else ("state_dict",):
        for key in a[weights]:
            assert torch.equal(a[weights][key], b[weights][key]), (weights, key)
    assert [h["val_accuracy"] for h in a["history"]] == [h["val_accuracy"] for h in b["history"]]
    if "ema_decay" in extra:  # the average is what is saved (and exported), not the last step's weights
        assert a["ema_steps"] == b["ema_steps"] > 0 and a["config"]["width"] == 8
        assert not torch.equal(a["state_dict"]["features.0.0.weight"], a["train_state_dict"]["features.0.0.weight"])


def test_warmup_cosine_counts_optimizer_steps():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = train_mod.build_scheduler(TrainConfig(schedule="cosine", warmup_steps=4, optimizer="sgd"), opt, 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.25) and lrs[4] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert lrs[:5] == sorted(lrs[:5]) and lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 0.02
    # A small dataset: 4 epochs of 28 steps make 112 steps; a floor of 500 makes each epoch 5 passes.
    assert train_mod.passes_per_epoch(TrainConfig(epochs=4, min_steps=500), 28) == 5
    assert train_mod.passes_per_epoch(TrainConfig(epochs=30, min_steps=500), 28) == 1


def test_resume_refuses_changed_settings(tmp_path):
    train_tiny(tmp_path, "r", "simple_cnn", "digits", epochs=1, val_fraction=0.5)
    with pytest.raises(ValueError, match="cannot --resume .*model"):
        train_tiny(tmp_path, "r", "lenet", "digits", epochs=1, val_fraction=0.5, resume=True)


def test_bf16_autocast_and_accumulation_on_cpu(tmp_path):
    best = train_tiny(tmp_path, "bf16", "bn_cnn", "digits", epochs=1, precision="bf16",
                      accum_steps=2, clip_grad_norm=1.0, label_smoothing=0.1, optimizer="sgd",
                      nesterov=True, schedule="cosine", val_fraction=0.5)
    assert load_checkpoint(best)["config"]["precision"] == "bf16"


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        train_tiny(tmp_path, "fp16", "simple_cnn", "digits", precision="fp16")


def test_cifar10_run_from_pickle_batches(cifar_checkpoint):
    ckpt = load_checkpoint(cifar_checkpoint)
    assert ckpt["arch"] == "cifarnet" and ckpt["contract"]["mean"][0] == pytest.approx(0.4914)


def _cli(*args, cwd=REPO, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def test_cli_missing_data_is_one_clear_line(tmp_path):
    out = _cli("train", "--run", "x", "--dataset", "cifar10", "--data-dir", str(tmp_path),
               "--runs-dir", str(tmp_path / "runs"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CIFAR10") and "data_batch_1" in lines[0]
    assert "--data-dir" in lines[0]


def test_cli_bad_option_is_one_clear_line(tmp_path):
    out = _cli("train", "--model", "resnet18", "--runs-dir", str(tmp_path))
    assert out.returncode == 2 and "--pretrained-weights" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_evaluate_json_and_confusion_matrix(digits_checkpoint, tmp_path):
    out = _cli("evaluate", "--checkpoint", str(digits_checkpoint), "--dataset", "digits", "--json",
               "--out-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["samples"] == 360
    assert set(metrics["per_class"]) == {str(i) for i in range(10)}
    assert {"precision", "recall", "f1", "support"} <= set(metrics["per_class"]["3"])
    # The same number the trainer stored for the test split.
    assert metrics["accuracy"] == pytest.approx(load_checkpoint(digits_checkpoint)["metrics"]["test_accuracy"])
    matrix = json.loads((tmp_path / "confusion_matrix.json").read_text())["rows_true_cols_pred"]
    assert sum(map(sum, matrix)) == 360
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_defaults_to_the_checkpoints_dataset_and_prints_per_class(digits_checkpoint, tmp_path, capsys):
    from training.__main__ import main

    assert main(["evaluate", "--checkpoint", str(digits_checkpoint), "--out-dir", str(tmp_path),
                 "--workers", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support"]
    assert [line.split()[0] for line in lines[1:11]] == [str(i) for i in range(10)]
    assert sum(int(line.split()[-1]) for line in lines[1:11]) == 360
    stored = load_checkpoint(digits_checkpoint)["metrics"]["test_accuracy"]
    assert lines[-1] == f"accuracy {stored:.4f} on 360 images of digits"


def test_cli_evaluate_refuses_other_contract(digits_checkpoint, tiny_cifar_dir):
    out = _cli("evaluate", "--checkpoint", str(digits_checkpoint), "--dataset", "cifar10",
               "--data-dir", str(tiny_cifar_dir))
    assert out.returncode == 2 and "trained for input" in out.stderr


def test_cli_visualize(digits_checkpoint, tmp_path):
    from PIL import Image
    Image.new("L", (40, 40), 200).save(tmp_path / "digit.png")
    out = _cli("visualize", "--checkpoint", str(digits_checkpoint), "--image", str(tmp_path / "digit.png"),
               "--out-dir", str(tmp_path / "vis"))
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "vis").iterdir())
    assert "filters.png" in names and any(n.startswith("features_") for n in names)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    """DDP with gloo: 2 processes, rank 0 saves; the printed best path exists."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "training", "train", "--run-name", "ddp", "--model", "simple_cnn", "--dataset", "digits",
         "--epochs", "2", "--workers", "0", "--min-steps", "0", "--runs-dir", str(tmp_path), "--no-tensorboard",
         "--val-fraction", "0.5", "--ema-decay", "0.9"],
        capture_output=True, text=True, cwd=REPO, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = [line for line in out.stdout.splitlines() if line.endswith("ddp/best.pt")]
    assert printed == [str(tmp_path / "ddp/best.pt")]  # rank 0 only
    last = load_checkpoint(tmp_path / "ddp/last.pt")
    assert len(last["rng"]) == 2 and last["epoch"] == 2 and last["ema_steps"] > 0
    assert [h["epoch"] for h in last["history"]] == [1, 2]


DDP_SHARDS = """
import json, os, sys
import torch.distributed as dist
from training.config import TrainConfig
from training.train import build_pipeline, init_distributed, resolve_device
rank, world, device = init_distributed(resolve_device("cpu"))
cfg = TrainConfig(dataset="digits", batch_size=64, min_steps=0, seed=3)
pipe = build_pipeline(cfg, rank, world, device)
pipe.set_epoch(1)
mine = [sorted(map(int, pipe.train.indices())), [int(y) for _, labels in pipe.train for y in labels]]
everyone = [None] * world
dist.all_gather_object(everyone, mine)
if rank == 0:
    json.dump({"kind": pipe.kind, "shards": everyone}, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_ranks_get_disjoint_shards_of_the_tensor_pipeline(tmp_path):
    """Two gloo processes build the trainer's pipeline: their epoch's samples are disjoint, equally
    many, and the labels they train on are those samples' labels."""
    script = tmp_path / "shards.py"
    script.write_text(DDP_SHARDS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path / "shards.json")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "shards.json").read_text())
    (a, labels_a), (b, labels_b) = report["shards"]
    assert report["kind"] == "tensor"
    assert len(a) == len(b) > 0 and not set(a) & set(b)
    from training.tensordata import load_tensor_splits
    train = load_tensor_splits("digits", val_fraction=0.1, seed=3).train
    assert sorted(labels_a) == sorted(train.labels[a].tolist()) and sorted(labels_b) == sorted(train.labels[b].tolist())


def test_auto_precision_follows_the_cpus_bf16_units(monkeypatch):
    """--precision auto: bf16 only where the CPU computes it natively (AVX2 alone emulates it, slower
    than fp32); named precisions pass through."""
    from training import machine

    avx2 = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
    amx = "model name\t: Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert not machine.native_bf16(avx2) and machine.native_bf16(amx)
    cpu = torch.device("cpu")
    for text, want in ((avx2, "fp32"), (amx, "bf16")):
        monkeypatch.setattr(train_mod, "native_bf16", lambda text=text: machine.native_bf16(text))
        assert train_mod.resolve_precision("auto", cpu) == want
    assert train_mod.resolve_precision("fp16", cpu) == "fp16" and train_mod.resolve_precision("fp32", cpu) == "fp32"


def test_auto_precision_is_settled_before_the_run_is_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "native_bf16", lambda: False)
    train_tiny(tmp_path, "auto", "simple_cnn", "digits", epochs=1, val_fraction=0.5, precision="auto")
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["precision"] == "fp32"
