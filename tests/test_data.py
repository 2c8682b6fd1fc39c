"""Datasets through the real torchvision readers, on tiny files in the exact on-disk formats."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from training.datafiles import write_imagefolder, write_mnist_gz
from training.contract import Contract, Normalize
from training.data import DataNotFoundError, build_transform, load_splits


def test_mnist_idx_gz_files(tiny_mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # staging (decompression) goes to ./data
    s = load_splits("mnist", tiny_mnist_dir, val_fraction=0.1)
    assert (len(s.train), len(s.val), len(s.test)) == (270, 30, 100)
    x, y = s.test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    assert s.contract.mean == (0.1307,) and s.contract.std == (0.3081,)
    assert len(list(tmp_path.glob("data/staged/*/MNIST/raw/train-images-idx3-ubyte"))) == 1


def test_idx_staging_follows_its_source_folder(tmp_path, monkeypatch):
    """Files staged from one folder are never read for another, nor after the source changed."""
    monkeypatch.chdir(tmp_path)
    big, small = write_mnist_gz(tmp_path / "big", n_train=30, n_test=10), write_mnist_gz(tmp_path / "small", n_train=20, n_test=10)
    assert len(load_splits("fashion-mnist", big, val_fraction=0.0).train) == 30
    assert len(load_splits("fashion-mnist", small, val_fraction=0.0).train) == 20
    write_mnist_gz(small, n_train=25, n_test=10)  # rewritten in place: new mtimes
    for f in small.iterdir():
        os.utime(f, ns=(f.stat().st_mtime_ns + 10**9, f.stat().st_mtime_ns + 10**9))
    assert len(load_splits("fashion-mnist", small, val_fraction=0.0).train) == 25


def test_fashion_mnist_uses_its_own_contract(tiny_mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_splits("fashion-mnist", tiny_mnist_dir)
    assert s.contract.class_names[0] == "T-shirt/top" and s.contract.mean != (0.1307,)


def test_cifar10_pickle_batches(tiny_cifar_dir):
    s = load_splits("cifar10", tiny_cifar_dir, val_fraction=0.0)
    assert len(s.train) == 200 and len(s.test) == 60
    x, y = s.test[5]
    assert x.shape == (3, 32, 32) and y == 5
    assert s.contract.class_names[3] == "cat"


@pytest.mark.parametrize("split", [True, False])
def test_imagefolder(tmp_path, split):
    root = write_imagefolder(tmp_path / "tree", split=split)
    s = load_splits("imagefolder", root, image_size=40, val_fraction=0.0)
    assert s.contract.class_names == ("ants", "bees")
    assert s.contract.input_shape == (3, 40, 40)
    x, _ = s.test[0]
    assert x.shape == (3, 40, 40)
    if not split:  # a fixed 20 % of each class is held out, disjoint from training
        assert len(s.test) == 4 and len(s.train) == 20


def test_digits_embedded_split_is_fixed():
    a, b = load_splits("digits", seed=0), load_splits("digits", seed=0)
    assert len(a.test) == 360 and len(a.train) + len(a.val) == 1437
    assert torch.equal(a.test[17][0], b.test[17][0])
    assert a.contract.input_shape == (1, 28, 28) and a.contract.class_names[9] == "9"


def test_augmentation_only_in_training():
    s = load_splits("digits")
    torch.manual_seed(0)
    assert torch.equal(s.val[0][0], s.val[0][0]) and torch.equal(s.test[0][0], s.test[0][0])
    draws = [s.train[0][0] for _ in range(5)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        load_splits("mnist", tmp_path)
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        load_splits("cifar10", tmp_path)
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_splits("imagefolder", None)


def test_training_transform_matches_in_graph_normalisation():
    """The float pipeline used in training and the uint8 Normalize inside exported graphs agree."""
    contract = Contract(28, 28, 3, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), tuple("abcdefghij"))
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    float_path = build_transform(contract)(Image.fromarray(pixels))
    graph_path = Normalize(contract)(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0]
    torch.testing.assert_close(float_path, graph_path, atol=1e-5, rtol=1e-5)


def test_contract_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="one value per channel"):
        Contract(28, 28, 3, (0.5,), (0.5,), ("a", "b"))
    assert Contract.from_dict(Contract(8, 8, 1, (0.5,), (0.2,), ("a", "b")).to_dict()).height == 8


def test_gz_mnist_files_written_by_tests_are_real_idx(tmp_path):
    import gzip
    root = write_mnist_gz(tmp_path, n_train=10, n_test=10)
    raw = gzip.open(root / "train-images-idx3-ubyte.gz").read()
    assert raw[:4] == b"\x00\x00\x08\x03" and len(raw) == 16 + 10 * 28 * 28
