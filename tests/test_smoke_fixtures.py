import pytest

from training.checkpoint import load_checkpoint
from training.evaluate import evaluate_checkpoint


def test_digits_checkpoint_learns(digits_checkpoint):
    ckpt = load_checkpoint(digits_checkpoint)
    assert ckpt["metrics"]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_cifar_checkpoint_rebuilds(cifar_checkpoint, tiny_cifar_dir, tmp_path):
    """The checkpoint alone rebuilds the model: read back through evaluate's own loader (the CIFAR-10
    pickle batches, RGB), it scores what the trainer recorded on the same test split."""
    ckpt = load_checkpoint(cifar_checkpoint)
    metrics = evaluate_checkpoint(cifar_checkpoint, data_dir=str(tiny_cifar_dir), out_dir=tmp_path, workers=0)
    assert ckpt["contract"]["channels"] == 3  # read from the data files, not from the model's name
    assert metrics["samples"] == ckpt["metrics"]["test_samples"]
    assert metrics["accuracy"] == pytest.approx(ckpt["metrics"]["test_accuracy"])
