"""The tensor pipeline: same splits and pixels as the PIL path, batch augmentation with the PIL
path's distributions, seeded batches, disjoint DDP shards, the ImageFolder cache."""

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from training.datafiles import write_imagefolder
from training.augment import augment_batch
from training.contract import Contract, Normalize
from training.data import augmentation, load_splits
from training.tensordata import TensorBatches, TensorSet, cache_path, load_tensor_splits, shard_indices

N_TENSOR, N_PIL = 2000, 400  # draws per path: share standard errors ~0.01 and ~0.025


def test_tensor_splits_are_the_pil_splits():
    pil = load_splits("digits", augment="none", val_fraction=0.2, seed=3)
    ten = load_tensor_splits("digits", val_fraction=0.2, seed=3)
    assert (len(ten.train), len(ten.val), len(ten.test)) == (len(pil.train), len(pil.val), len(pil.test))
    assert ten.contract == pil.contract and ten.train.images.dtype == torch.uint8
    for tset, dset in ((ten.val, pil.val), (ten.test, pil.test), (ten.train, pil.train)):
        expected = torch.stack([dset[i][0] for i in range(8)])
        torch.testing.assert_close(Normalize(ten.contract)(tset.images[:8]), expected, atol=1e-5, rtol=1e-5)
        assert tset.labels[:8].tolist() == [dset[i][1] for i in range(8)]


def test_mnist_and_cifar_read_their_uint8_arrays(tiny_mnist_dir, tiny_cifar_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = load_tensor_splits("mnist", tiny_mnist_dir, val_fraction=0.1)
    assert m.train.images.shape == (270, 1, 28, 28) and m.test.labels[:3].tolist() == [0, 1, 2]
    c = load_tensor_splits("cifar10", tiny_cifar_dir, val_fraction=0.0)
    pil = load_splits("cifar10", tiny_cifar_dir, val_fraction=0.0)
    assert c.train.images.shape == (200, 3, 32, 32)
    torch.testing.assert_close(Normalize(c.contract)(c.test.images[5:6])[0], pil.test[5][0], atol=1e-5, rtol=1e-5)
    assert load_tensor_splits("mnist", tiny_mnist_dir, max_bytes=1000) is None  # too big: loader


# ---- augmentation: distributions against the PIL path ----------------------------------------------
def _ramp(h: int, w: int, c: int = 1, axis: int = 1) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 whose value is 255 // (size - 1) x the column (axis=1) or row
    (axis=0) index: 9 x at 28 px."""
    grid = np.indices((h, w))[axis].astype(np.uint8) * (255 // ((h, w)[axis] - 1))
    return grid if c == 1 else np.repeat(grid[..., None], c, axis=2)


def _tensor_draws(policy: str, img: np.ndarray, seed: int = 0) -> torch.Tensor:
    x = torch.from_numpy(img).float()
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    out = augment_batch(policy, x.expand(N_TENSOR, *x.shape[1:]).contiguous(), torch.Generator().manual_seed(seed))
    return out[:, 0]                                                          # (N, H, W), channel 0


def _pil_draws(policy: str, img: np.ndarray, contract: Contract) -> torch.Tensor:
    torch.manual_seed(0)
    ops = v2.Compose([*augmentation(policy, contract), v2.PILToTensor()])
    pil = Image.fromarray(img)
    return torch.stack([ops(pil)[0].float() for _ in range(N_PIL)])


def _crop_offsets(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset, flipped) of each crop of a 28-wide column ramp: output column 14 shows source column
    10 + offset unflipped, 9 + offset flipped (never a reflected pixel, for offsets 0..8)."""
    middle = out[:, 14, 14] / 9
    flipped = out[:, 14, 15] < out[:, 14, 14]
    return (middle - torch.where(flipped, 9, 10)).round().long(), flipped


@pytest.mark.parametrize("axis", [1, 0])
def test_crop_flip_matches_pil_distribution(axis):
    contract = Contract(28, 28, 1, (0.5,), (0.5,), ("a", "b"))
    img = _ramp(28, 28, axis=axis)
    ten, pil = _tensor_draws("crop-flip", img), _pil_draws("crop-flip", img, contract)
    for out in (ten, pil):
        assert out.shape[1:] == (28, 28) and out.min() >= 0 and out.max() <= 255
    if axis == 0:  # rows: flips do not show, offsets along the rows are read off the transposed ramp
        ten, pil = ten.transpose(1, 2), pil.transpose(1, 2)
    (t_off, t_flip), (p_off, p_flip) = _crop_offsets(ten), _crop_offsets(pil)
    for off in (t_off, p_off):
        assert off.min() == 0 and off.max() == 8                              # within the 4 px padding
    t_share = torch.bincount(t_off, minlength=9) / len(t_off)
    p_share = torch.bincount(p_off, minlength=9) / len(p_off)
    assert (t_share - 1 / 9).abs().max() < 0.04 and (p_share - 1 / 9).abs().max() < 0.06
    if axis == 1:
        assert abs(t_flip.float().mean() - 0.5) < 0.04 and abs(p_flip.float().mean() - 0.5) < 0.08


def _centroid_x(out: torch.Tensor) -> torch.Tensor:
    w = out.sum((1, 2)).clamp(min=1)
    return (out.sum(1) * torch.arange(out.shape[2])).sum(1) / w


def test_affine_matches_pil_distribution():
    contract = Contract(28, 28, 1, (0.5,), (0.5,), ("a", "b"))
    img = np.zeros((28, 28), np.uint8)
    img[8:20, 11:17] = 255                                                   # a bar, like a "1"
    ten, pil = _tensor_draws("affine", img), _pil_draws("affine", img, contract)
    # Values stay pixels (nearest sampling, black fill); never flipped; shifts up to 10 % of 28 px.
    for out in (ten, pil):
        assert set(out.unique().tolist()) <= {0.0, 255.0}
        shift = _centroid_x(out) - 13.5
        assert shift.abs().max() <= 0.1 * 28 + 1.5 and abs(shift.mean()) < 0.3
    t_std, p_std = (_centroid_x(o).std() for o in (ten, pil))
    t_mass, p_mass = ten.sum((1, 2)).mean(), pil.sum((1, 2)).mean()          # scale 0.9..1.1: area
    assert abs(t_std / p_std - 1) < 0.2 and abs(t_mass / p_mass - 1) < 0.05


def test_resized_crop_matches_pil_distribution():
    contract = Contract(40, 40, 3, (0.5,) * 3, (0.5,) * 3, ("a", "b"))
    img = _ramp(40, 40, c=3)
    ten, pil = _tensor_draws("resized-crop", img), _pil_draws("resized-crop", img, contract)
    for out in (ten, pil):
        assert out.shape[1:] == (40, 40) and out.min() >= 0 and out.max() <= 255
    # The middle row spans the crop's columns: its range / the full range is the crop's width share,
    # sqrt(0.5 * 3/4) ~ 0.61 .. 1; flipped crops run right to left.
    spans = [(o[:, 20, -1] - o[:, 20, 0]).abs() / (6 * 39) for o in (ten, pil)]
    flips = [(o[:, 20, -1] < o[:, 20, 0]).float().mean() for o in (ten, pil)]
    for span in spans:
        assert span.min() > 0.5 and span.max() <= 1.0 + 1e-6
    assert abs(spans[0].mean() - spans[1].mean()) < 0.03 and abs(flips[0] - 0.5) < 0.04 and abs(flips[1] - 0.5) < 0.08


def test_flip_matches_pil_distribution():
    """flip mirrors about half the images, whole, and moves no pixel otherwise, on both paths."""
    contract = Contract(28, 28, 1, (0.5,), (0.5,), ("a", "b"))
    img = _ramp(28, 28)
    src = torch.from_numpy(img).float()
    for out in (_tensor_draws("flip", img), _pil_draws("flip", img, contract)):
        mirrored = (out == src.flip(-1)).flatten(1).all(1)
        kept = (out == src).flatten(1).all(1)
        assert bool((mirrored | kept).all()) and abs(mirrored.float().mean() - 0.5) < 0.1


@pytest.mark.parametrize("policy", ["flip", "crop-flip", "affine", "resized-crop"])
def test_augmentation_is_deterministic_under_a_seed(policy):
    x = torch.randint(0, 256, (16, 3, 32, 32)).float()
    a, b = (augment_batch(policy, x, torch.Generator().manual_seed(5)) for _ in range(2))
    c = augment_batch(policy, x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tensor_batches_are_seeded_per_epoch_and_normalised():
    contract = Contract(28, 28, 1, (0.5,), (0.25,), tuple("abcdefghij"))
    data = TensorSet(torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8), torch.arange(100) % 10)
    batches = TensorBatches(data, contract, 32, augment="crop-flip", shuffle=True, drop_last=True, seed=1, repeats=2)
    assert len(batches) == 6                                                    # 2 passes x 100 // 32
    first, again = list(batches), list(batches)
    batches.set_epoch(1)
    other = list(batches)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, again))
    assert not torch.equal(first[0][1], other[0][1])                           # another order
    plain = TensorBatches(data, contract, 200)
    (x, y), = list(plain)
    torch.testing.assert_close(x, (data.images.float() / 255 - 0.5) / 0.25, atol=1e-5, rtol=1e-5)
    assert torch.equal(y, data.labels)


def test_shards_are_disjoint_and_equal():
    for world in (2, 3):
        shards = [shard_indices(100, epoch=4, seed=0, rank=r, world=world, repeats=1) for r in range(world)]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 100 // world
        union = torch.cat(shards)
        assert len(set(union.tolist())) == len(union)                             # disjoint
    again = shard_indices(100, epoch=4, seed=0, rank=1, world=3)
    assert torch.equal(again, shards[1])


# ---- ImageFolder cache ----------------------------------------------------------------------------
def test_imagefolder_cache_is_rebuilt_when_a_source_changes_and_never_used_stale(tmp_path):
    root = write_imagefolder(tmp_path / "tree", split=True, per_class=6)
    cache = tmp_path / "cache"
    first = load_tensor_splits("imagefolder", root, image_size=16, val_fraction=0.0, cache_dir=cache)
    assert first.train.images.shape == (12, 3, 16, 16) and first.test.images.shape == (4, 3, 16, 16)
    pil = load_splits("imagefolder", root, augment="none", image_size=16, val_fraction=0.0)
    torch.testing.assert_close(Normalize(first.contract)(first.train.images[:3]),
                               torch.stack([pil.train[i][0] for i in range(3)]), atol=1e-5, rtol=1e-5)
    files = sorted(cache.iterdir())
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]

    again = load_tensor_splits("imagefolder", root, image_size=16, val_fraction=0.0, cache_dir=cache)
    assert torch.equal(again.train.images, first.train.images)
    assert [f.stat().st_mtime_ns for f in files] == stamps                    # read, not rewritten

    # Change one source image (new pixels, new mtime): the train cache is rebuilt with them.
    changed = root / "train" / "ants" / "ants_1.png"
    Image.new("RGB", (48, 48), (0, 0, 255)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    fresh = load_tensor_splits("imagefolder", root, image_size=16, val_fraction=0.0, cache_dir=cache)
    def blue(images):  # images that are the new all-blue file
        return ((images[:, 2] == 255).flatten(1).all(1) & (images[:, :2] == 0).flatten(1).all(1)).sum()

    assert blue(first.train.images) == 0 and blue(fresh.train.images) == 1

    # A cache file whose key does not match the files is never read: plant one full of zeros.
    train_cache = cache_path(str(root / "train"), first.contract, cache)
    torch.save({"key": "stale", "images": torch.zeros_like(fresh.train.images),
                "labels": fresh.train.labels}, train_cache)
    reread = load_tensor_splits("imagefolder", root, image_size=16, val_fraction=0.0, cache_dir=cache)
    assert torch.equal(reread.train.images, fresh.train.images)
