"""One image conversion for training and serving: the same file gives the same tensor in both paths.

Training reads an ImageFolder tree through ``training.data`` (its loader and transforms); serving
decodes the same bytes from a request through ``serving.core``. Both must give identical uint8
pixels for every mode that needs converting: alpha, 16-bit, palette with transparency, CMYK, EXIF
orientation, and images large enough to be reduced before resizing.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.core import InferenceCore, Limits
from training import images
from training.contract import Contract
from training.data import load_splits, to_contract


def _files() -> dict[str, tuple[bytes, str]]:
    """name -> (encoded bytes, file extension)."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 255, (50, 70, 4), np.uint8), "RGBA")
    palette = Image.fromarray(rng.integers(0, 255, (40, 40), np.uint8)).convert("P")
    palette.info["transparency"] = 3
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    photo = Image.fromarray(rng.integers(0, 255, (60, 90, 3), np.uint8))
    out = {}
    for name, img, fmt, kw in [
        ("rgba", rgba, "PNG", {}),
        ("la", Image.new("LA", (30, 30), (40, 100)), "PNG", {}),
        ("gray16", Image.fromarray(rng.integers(0, 65535, (33, 47), dtype=np.uint16)), "PNG", {}),
        ("palette_transparent", palette, "PNG", {}),
        ("gif", palette, "GIF", {}),
        ("cmyk", Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG", {}),
        ("exif_rotated", photo, "JPEG", {"exif": exif, "quality": 90}),
        ("large_rgba", Image.fromarray(rng.integers(0, 255, (700, 900, 4), np.uint8), "RGBA"), "PNG", {}),
        ("large_jpeg", Image.fromarray(rng.integers(0, 255, (800, 600, 3), np.uint8)), "JPEG", {}),
        ("webp", photo, "WEBP", {}),
        ("tiff_gray16", Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)), "TIFF", {}),
    ]:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[name] = (buf.getvalue(), fmt.lower().replace("jpeg", "jpg"))
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("same-tensor")
    for name, (data, ext) in _files().items():
        for cls in ("a", "b"):  # ImageFolder needs a file per class folder; a holds the probes
            (root / cls).mkdir(exist_ok=True)
            (root / cls / f"{name}.{ext}").write_bytes(data)
    return root


def test_training_and_serving_give_the_same_tensor(tree):
    splits = load_splits("imagefolder", tree, image_size=32, augment="none")
    contract = splits.contract
    train_view = _raw(splits, contract)  # the training path, up to (but without) normalisation
    core = InferenceCore(type("R", (), {"contract": contract})(), Limits())
    seen = 0
    for path, pixels in train_view:
        served = core.to_pixels(path.read_bytes(), invert="no")
        assert served.dtype == np.uint8 and served.shape == contract.input_shape
        assert np.array_equal(served, pixels), path.name
        seen += 1
    assert seen == 2 * len(_files())


def _raw(splits, contract: Contract):
    """(file, (C, H, W) uint8) of every image, as training's ImageFolder loads and converts it."""
    base = splits.train
    while hasattr(base, "dataset"):  # Subset(s) around the ImageFolder
        base = base.dataset
    for path, _ in base.samples:
        img = base.loader(path)
        for op in to_contract(contract):
            img = op(img)
        yield Path(path), images.to_array(img)


def test_exif_and_modes_are_applied_once():
    contract = Contract(8, 8, 3, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    loaded = images.load(images.draft(images.open_image(io.BytesIO(buf.getvalue())), contract))
    assert loaded.size == (10, 20)  # drafted to 1/2 (still >= 8 px), rotated: the white half on top
    a = np.asarray(images.to_contract(loaded, contract).convert("L"))
    assert a[:4].mean() > 200 and a[4:].mean() < 60


def test_shrink_is_a_noop_near_the_contract_size():
    contract = Contract(28, 28, 1, (0.5,), (0.25,), ("a", "b"))
    small = Image.new("L", (80, 80))
    assert images.shrink(small, contract) is small  # 80 < 3 x 28 x 2: not reduced
    big = Image.new("I;16", (1000, 800))
    reduced = images.shrink(big, contract)
    assert reduced.mode == "I" and reduced.size[1] >= 3 * 28 and reduced.size[1] < 800
