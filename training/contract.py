"""The preprocessing contract: what a model expects as input, defined once by the dataset.

The contract travels with every checkpoint (``checkpoint["contract"]``), is copied into every export
manifest, and is read by the server. Nothing downstream re-declares these numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Contract:
    """Input contract of a classifier.

    Attributes:
        height, width: spatial size in pixels the model is trained and served at.
        channels: 1 (grayscale) or 3 (RGB).
        mean, std: per-channel normalisation applied to pixels scaled to [0, 1].
        class_names: label of each output index.
        layout: memory layout of the uint8 tensor exported graphs take ("NCHW").
        dtype: element type exported graphs take ("uint8": 0..255 pixels, scaling inside the graph).
    """

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    layout: str = "NCHW"
    dtype: str = "uint8"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"contract channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != self.channels:
                raise ValueError(
                    f"contract {name} has {len(values)} values for {self.channels} channel(s): "
                    f"give one value per channel"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"contract std must be positive, got {self.std}")
        if len(self.class_names) < 2:
            raise ValueError(f"a classifier needs at least 2 class names, got {self.class_names}")
        if self.layout != "NCHW":
            raise ValueError(f"only NCHW layout is supported, got {self.layout!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Contract:
        return cls(
            height=int(data["height"]),
            width=int(data["width"]),
            channels=int(data["channels"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            class_names=tuple(str(v) for v in data["class_names"]),
            layout=str(data.get("layout", "NCHW")),
            dtype=str(data.get("dtype", "uint8")),
        )


class Normalize(nn.Module):
    """uint8 (or [0, 255] float) NCHW pixels -> normalised float, as the contract says.

    Exported graphs start with this module so that every runtime applies identical preprocessing and
    the server only decodes and resizes. Training uses the same numbers through ``normalize_float``.
    """

    def __init__(self, contract: Contract) -> None:
        super().__init__()
        c = contract.channels
        # Fold /255 into the affine map: y = x * scale + shift, one fused multiply-add per pixel.
        mean = torch.tensor(contract.mean, dtype=torch.float32).view(1, c, 1, 1)
        std = torch.tensor(contract.std, dtype=torch.float32).view(1, c, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) uint8 -> float32
        return x.to(torch.float32) * self.scale + self.shift


class WithPreprocessing(nn.Module):
    """A classifier that takes uint8 pixels: ``Normalize`` then the trained model."""

    def __init__(self, model: nn.Module, contract: Contract) -> None:
        super().__init__()
        self.normalize = Normalize(contract)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))
