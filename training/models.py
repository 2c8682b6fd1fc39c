"""Model registry. Models are pure ``nn.Module``s: no device, precision or training code in here.

Every architecture is built by ``build_model(arch, in_channels=..., num_classes=..., image_size=...)``
so a checkpoint that stores ``arch`` and those arguments can rebuild its model anywhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm


def _pooled(size: int, times: int) -> int:
    """Spatial size after ``times`` 2x2 max-pools (floor division, as nn.MaxPool2d does)."""
    for _ in range(times):
        size //= 2
    return size


class LeNet(nn.Module):
    """LeNet from the PyTorch MNIST tutorial: conv 1->10->20 (5x5), fc 320->50->10."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        side = ((image_size - 4) // 2 - 4) // 2  # 28 -> 24 -> 12 -> 8 -> 4
        self.fc1 = nn.Linear(20 * side * side, 50)  # 320 at 28x28
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.dropout(F.relu(self.fc1(torch.flatten(x, 1))), training=self.training)
        return self.fc2(x)


class MnistCNN(nn.Module):
    """pytorch/examples mnist/main.py: conv 32/64 (3x3), max-pool, fc 128, dropout 0.25/0.5."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        side = (image_size - 4) // 2  # two valid 3x3 convs, one pool: 28 -> 12
        self.fc1 = nn.Linear(64 * side * side, 128)  # 9216 at 28x28
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return self.fc2(x)


class SimpleCNN(nn.Module):
    """Two conv blocks (16/32 channels, 3x3, same padding, max-pool) and a dropout-0.5 classifier."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = _pooled(image_size, 2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(32 * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CifarNet(nn.Module):
    """The classic CIFAR-10 tutorial net: conv 32-32-64 (5x5, pad 2) each with max-pool,
    fc 1024->64->10."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = _pooled(image_size, 3)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 64),
            nn.ReLU(inplace=True),  # 1024 at 32x32
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class BnCNN(nn.Module):
    """Conv-BatchNorm-ReLU blocks (32/64/128 at the default width), global average pooling and
    dropout: size-agnostic."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, dropout: float = 0.3, width: int = 32
    ) -> None:
        super().__init__()
        del image_size  # AdaptiveAvgPool makes the head independent of the input size
        w = width
        self.features = nn.Sequential(
            conv_bn(in_channels, w),
            conv_bn(w, w),
            nn.MaxPool2d(2),
            conv_bn(w, 2 * w),
            conv_bn(2 * w, 2 * w),
            nn.MaxPool2d(2),
            conv_bn(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def flip_averaged(features: nn.Module, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """``features(x)``, or with ``flip`` the mean of the image's and its mirror image's features.

    Flip test-time augmentation inside the model, so that every export carries it. Averaging the
    features before a linear head gives the mean of the two passes' logits, and the out-of-distribution
    detector (the head's input) reads one feature vector.
    """
    if not flip:
        return features(x)
    # Two passes, not one over a concatenated batch of 2N: slicing that batch at a symbolic N broke ONNX
    # Runtime's shape inference (the ONNX INT8 export), and chunk(2) fixed the graph's batch size. The
    # mirror image goes first, so that a forward hook keeping the last call sees the original
    # (training.visualize).
    mirrored = features(x.flip(-1))
    return (features(x) + mirrored) / 2


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class GlobalMaxPool(nn.Module):
    """(N, C, H, W) -> (N, C), the maximum over space. ``AdaptiveMaxPool2d(1)`` + ``Flatten`` computes the
    same, but its ONNX export defeats ONNX Runtime's symbolic shape inference, which the ONNX INT8
    variant needs; a ReduceMax does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(x, dim=(2, 3))


class PooledResNet(nn.Module):
    """The residual nets' shared head: a body ending in global pooling, a bias-free linear layer whose
    logits are scaled by 1/8, and optional flip test-time augmentation (``flip_averaged``)."""

    def __init__(self, body: nn.Sequential, features: int, num_classes: int, flip_tta: bool) -> None:
        super().__init__()
        self.flip_tta = flip_tta
        self.net = body
        self.fc = nn.Linear(features, num_classes, bias=False)
        # Scaling the logits down (airbench uses 1/8) keeps the early softmax soft: faster, steadier
        # convergence with label smoothing and a one-cycle schedule.
        self.logit_scale = 0.125

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(flip_averaged(self.net, x, self.flip_tta and not self.training)) * self.logit_scale


class ResNet9(PooledResNet):
    """ResNet-9 in the spirit of the DAWNBench / airbench CIFAR-10 nets (~94 % in a short schedule on
    a GPU): prep 64 -> 128 + residual -> 256 -> 512 + residual -> global max-pool -> linear."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 64, flip_tta: bool = False
    ) -> None:
        del image_size  # global pooling
        w = width
        body = nn.Sequential(
            conv_bn(in_channels, w),
            conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            Residual(2 * w),
            conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            conv_bn(4 * w, 8 * w),
            nn.MaxPool2d(2),
            Residual(8 * w),
            GlobalMaxPool(),
        )
        super().__init__(body, 8 * w, num_classes, flip_tta)


class ResNet8(PooledResNet):
    """ResNet-9's pattern with one stage fewer, sized for 28x28: prep w at full size, pool -> 2w +
    residual at 14x14 -> pool -> 4w + residual at 7x7 -> global max-pool -> linear. Pooling right after
    the first conv keeps the costly convolutions at 14x14 and below."""

    # Width 16: on 2 AVX2 cores it trains ~2,100 images/s, five epochs in a 3-minute budget, and ended
    # ahead of widths 20 and 24 (fewer epochs) and of bn_cnn in that budget (docs/benchmarks.md, sweep).
    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 16, flip_tta: bool = False
    ) -> None:
        del image_size  # global pooling
        w = width
        body = nn.Sequential(
            conv_bn(in_channels, w),
            nn.MaxPool2d(2),
            conv_bn(w, 2 * w),
            Residual(2 * w),
            nn.MaxPool2d(2),
            conv_bn(2 * w, 4 * w),
            Residual(4 * w),
            GlobalMaxPool(),
        )
        super().__init__(body, 4 * w, num_classes, flip_tta)


class Transfer(nn.Module):
    """A torchvision backbone (resnet18 / vgg16) with a new classification head.

    Weights come from a local file loaded by the trainer (``training.train.load_pretrained``); this
    module only defines structure, so a checkpoint can rebuild it without that file.
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 224,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        del image_size  # both backbones end in adaptive pooling
        if in_channels != 3:
            raise ValueError(
                f"{backbone} expects 3-channel RGB input, got in_channels={in_channels}; train it on an RGB dataset"
            )
        if backbone == "resnet18":
            self.backbone = tvm.resnet18(weights=None)
            head_in = self.backbone.fc.in_features
            self.backbone.fc = nn.Identity()
        elif backbone == "vgg16":
            self.backbone = tvm.vgg16(weights=None)
            head_in = self.backbone.classifier[-1].in_features
            self.backbone.classifier[-1] = nn.Identity()
        else:
            raise ValueError(f"unknown transfer backbone {backbone!r}")
        self.head = nn.Linear(head_in, num_classes)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    pretrained: bool = False  # needs a local weights file to train (transfer learning)
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    "lenet": ModelSpec(LeNet, description="LeNet (PyTorch MNIST tutorial)"),
    "mnist_cnn": ModelSpec(MnistCNN, description="pytorch/examples MNIST CNN"),
    "simple_cnn": ModelSpec(SimpleCNN, description="two conv blocks + dropout"),
    "cifarnet": ModelSpec(CifarNet, description="CIFAR-10 tutorial net, served as `cifarnet`"),
    "bn_cnn": ModelSpec(BnCNN, description="BatchNorm CNN with global average pooling"),
    "resnet9": ModelSpec(ResNet9, description="fast residual CIFAR-10 net (~94 % on GPU)"),
    "resnet8": ModelSpec(ResNet8, description="residual net sized for 28x28 (ResNet-9, one stage fewer)"),
    "resnet18": ModelSpec(
        lambda **kw: Transfer("resnet18", **kw),
        pretrained=True,
        description="torchvision ResNet-18, new head, local weights",
    ),
    "vgg16": ModelSpec(
        lambda **kw: Transfer("vgg16", **kw), pretrained=True, description="torchvision VGG-16, new head, local weights"
    ),
}


def takes(arch: str, argument: str) -> bool:
    """Whether the architecture's constructor has ``argument``: ``width`` (channels of its first stage;
    later stages scale with it), ``flip_tta``."""
    return argument in inspect.signature(MODELS[arch].builder).parameters


def build_model(arch: str, **kwargs) -> nn.Module:
    """Build an architecture by name; kwargs are the constructor's (in_channels, num_classes, ...)."""
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; choose one of {sorted(MODELS)}")
    return MODELS[arch].builder(**kwargs)
