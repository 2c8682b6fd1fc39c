from training.checkpoint import load_checkpoint


def test_digits_checkpoint_learns(digits_checkpoint):
    ckpt = load_checkpoint(digits_checkpoint)
    assert ckpt["arch"] == "simple_cnn"
    assert ckpt["metrics"]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_cifar_checkpoint_rebuilds(cifar_checkpoint):
    ckpt = load_checkpoint(cifar_checkpoint)
    assert ckpt["contract"]["channels"] == 3
    assert ckpt["dataset"] == "cifar10"
