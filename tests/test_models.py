"""One table covers every model: forward and backward at its input size."""

import pytest
import torch

from training.config import TrainConfig
from training.models import MODELS, build_model
from training.train import load_pretrained

# (arch, in_channels, image_size): each model at the input it is meant for.
CASES = [
    ("lenet", 1, 28), ("mnist_cnn", 1, 28), ("simple_cnn", 1, 28), ("cifarnet", 3, 32),
    ("bn_cnn", 1, 28), ("bn_cnn", 3, 32), ("resnet9", 3, 32), ("resnet8", 1, 28), ("resnet18", 3, 224), ("vgg16", 3, 224),
    ("simple_cnn", 3, 64), ("cifarnet", 3, 48),
]


def test_every_registered_model_is_covered():
    assert {arch for arch, _, _ in CASES} == set(MODELS)


@pytest.mark.parametrize("arch,channels,size", CASES)
def test_forward_backward(arch, channels, size):
    torch.manual_seed(0)
    model = build_model(arch, in_channels=channels, num_classes=7, image_size=size).train()
    x = torch.randn(2, channels, size, size)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch,channels,size", CASES)
def test_models_are_pure_modules(arch, channels, size):
    """No device or precision hidden inside: every tensor a model uses is a parameter or a buffer, so
    ``.to()`` moves all of it. On the meta device (shapes only, no data) a tensor left behind, or one
    made on a fixed device in ``forward``, fails the forward."""
    model = build_model(arch, in_channels=channels, num_classes=7, image_size=size).to("meta", torch.float64)
    logits = model.eval()(torch.empty(2, channels, size, size, device="meta", dtype=torch.float64))
    assert logits.device.type == "meta" and logits.dtype == torch.float64 and logits.shape == (2, 7)


@pytest.mark.parametrize("arch", ["bn_cnn", "resnet8", "resnet9"])
def test_width_scales_every_stage(arch):
    """--width sets the first stage's channels and the later stages follow (2x, 4x, ...): the
    parameter count of a conv net grows with the square of its width."""
    count = {w: sum(p.numel() for p in build_model(arch, in_channels=1, num_classes=10, image_size=28, width=w)
                    .parameters()) for w in (8, 16)}
    assert 3.5 < count[16] / count[8] < 4.1
    assert build_model(arch, in_channels=1, num_classes=10, image_size=28, width=8)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("arch, channels, size", [("resnet8", 1, 28), ("resnet9", 3, 32)])
def test_flip_tta_is_the_mean_of_both_views_in_eval_only(arch, channels, size):
    torch.manual_seed(0)
    plain = build_model(arch, in_channels=channels, num_classes=10, image_size=size, width=8)
    tta = build_model(arch, in_channels=channels, num_classes=10, image_size=size, width=8, flip_tta=True)
    tta.load_state_dict(plain.state_dict())  # the same weights: TTA adds no parameter
    x = torch.randn(4, channels, size, size)
    with torch.no_grad():
        plain.eval(), tta.eval()
        torch.testing.assert_close(tta(x), (plain(x) + plain(x.flip(-1))) / 2)
        assert torch.equal(tta(x), tta(x.flip(-1)))  # a mirror image gets the same answer, exactly
        plain.train(), tta.train()
        torch.manual_seed(1)
        a = plain(x)
        torch.manual_seed(1)
        assert torch.equal(tta(x), a)  # training sees one view


def test_width_only_for_models_that_have_one():
    assert TrainConfig(model="resnet8", width=16).width == 16
    with pytest.raises(ValueError, match=r"--model mnist_cnn has a fixed width; leave --width out.*'bn_cnn'"):
        TrainConfig(model="mnist_cnn", width=16)
    with pytest.raises(ValueError, match="--width must be >= 1, got 0"):
        TrainConfig(model="resnet8", width=0)
    with pytest.raises(ValueError, match=r"--model bn_cnn has no flip test-time augmentation.*'resnet8'"):
        TrainConfig(model="bn_cnn", flip_tta=True)


def test_lenet_matches_the_tutorial_shape():
    model = build_model("lenet", in_channels=1, num_classes=10, image_size=28)
    assert model.fc1.in_features == 320 and model.fc1.out_features == 50
    cifar = build_model("cifarnet", in_channels=3, num_classes=10, image_size=32)
    assert cifar.classifier[1].in_features == 1024


def test_frozen_backbone_trains_only_the_head():
    model = build_model("resnet18", num_classes=3, freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_transfer_models_require_local_weights():
    with pytest.raises(ValueError, match="--pretrained-weights FILE"):
        TrainConfig(model="resnet18", dataset="imagefolder")


def test_load_pretrained_from_local_file(tmp_path):
    from torchvision.models import resnet18

    source = resnet18(weights=None, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("resnet18", num_classes=2)
    load_pretrained(model, str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert model.head.out_features == 2  # the ImageNet head was dropped, not loaded

    torch.save({"nothing": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not look like weights"):
        load_pretrained(build_model("resnet18", num_classes=2), str(tmp_path / "wrong.pth"))
