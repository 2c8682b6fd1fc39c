"""What an exported variant is, in one table: name, file, runtime, precision, devices, builder,
the INT8 recipes export tries before rejecting it, and its rank as the CUDA default.

Everything else reads this table: export builds and gates what it lists (``export.core``), the loader
dispatches on its runtime (``export.runtime``), the CLIs, the archive and the handler accept its names.
Adding a variant is one ``register`` call (a runtime not yet known also needs a loader in
``export.runtime.LOADERS``). Builders import the heavy exporters (torch.onnx, ORT quantization) only
when called, so the server can import this table cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # type names only: importing them would load torch, and export.core imports this table
    from export.core import ExportConfig
    from training.contract import Contract

PRECISIONS = ("fp32", "int8")


@dataclass
class BuildContext:
    """What a builder gets: the float model, its contract, calibration pixels, the staging folder
    (where an INT8 builder may find or make the fp32 ONNX graph) and the export settings."""

    model: object
    contract: Contract
    calibration: np.ndarray | None
    staging: Path
    settings: ExportConfig


@dataclass(frozen=True)
class Variant:
    """One exported variant.

    Attributes:
        name: what the manifest, the CLIs and the archive call it.
        suffix: file suffix in ``artifacts/<RUN>/``.
        runtime: the loader (``export.runtime.LOADERS``) that runs it.
        precision: "fp32" (gated on parity with eager) or "int8" (gated on accuracy drop).
        devices: device types it runs on.
        build: ``build(ctx, path, recipe)`` writes the file.
        recipes: settings tried in order until the variant passes its gate (INT8: calibration
            method, per-channel weights, first and last layers kept in fp32); the manifest records
            the one chosen, or every one tried when it is rejected.
        cuda_rank: preference as the CUDA default (lowest wins); None: not a CUDA default.
    """

    name: str
    suffix: str
    runtime: str
    precision: str
    devices: tuple[str, ...]
    build: Callable[[BuildContext, Path, dict], None]
    recipes: tuple[dict, ...] = field(default_factory=lambda: ({},))
    cuda_rank: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"variant {self.name}: precision must be one of {PRECISIONS}")
        if not self.recipes:
            raise ValueError(f"variant {self.name}: give at least one recipe ({{}} for none)")


REGISTRY: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    REGISTRY[variant.name] = variant
    return variant


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def get(name: str) -> Variant:
    if name not in REGISTRY:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def cuda_default(names) -> str | None:
    """The preferred CUDA variant among ``names``."""
    ranks = {n: REGISTRY[n].cuda_rank for n in names if n in REGISTRY}
    ranked = {n: rank for n, rank in ranks.items() if rank is not None}
    return min(ranked, key=ranked.__getitem__) if ranked else None


# ---- the built-in variants ---------------------------------------------------------------------
def _calibration(ctx: BuildContext) -> np.ndarray:
    if ctx.calibration is None:
        raise ValueError("INT8 variants need calibration images: --calib-size must be > 0")
    return ctx.calibration


def _torchscript_fp32(ctx: BuildContext, path: Path, recipe: dict) -> None:
    from export import variants as V

    V.export_torchscript(ctx.model, ctx.contract, path)


def _onnx_fp32(ctx: BuildContext, path: Path, recipe: dict) -> None:
    from export import variants as V

    V.export_onnx(ctx.model, ctx.contract, path)


def _torchscript_int8(ctx: BuildContext, path: Path, recipe: dict) -> None:
    from export import variants as V

    quantized = V.quantize_torch(ctx.model, ctx.contract, _calibration(ctx), ctx.settings.quant_backend, **recipe)
    V.export_torchscript(quantized, ctx.contract, path)


def _onnx_int8(ctx: BuildContext, path: Path, recipe: dict) -> None:
    from export import variants as V

    fp32 = ctx.staging / "onnx-fp32.onnx"
    if not fp32.exists():  # onnx-int8 without onnx-fp32: quantize from a temporary fp32 graph
        fp32 = ctx.staging / ".onnx-int8-source.onnx"
        if not fp32.exists():
            V.export_onnx(ctx.model, ctx.contract, fp32)
    V.quantize_onnx(
        fp32,
        _calibration(ctx),
        path,
        reduce_range=ctx.settings.ort_reduce_range,
        activation_type=ctx.settings.ort_activation,
        **recipe,
    )


register(Variant("torchscript-fp32", ".pt", "torchscript", "fp32", ("cpu", "cuda"), _torchscript_fp32, cuda_rank=0))
register(Variant("onnx-fp32", ".onnx", "onnxruntime", "fp32", ("cpu", "cuda"), _onnx_fp32, cuda_rank=1))
# FX INT8 uses oneDNN/fbgemm quantized kernels, which exist on CPU only.
register(
    Variant(
        "torchscript-int8",
        ".pt",
        "torchscript",
        "int8",
        ("cpu",),
        _torchscript_int8,
        recipes=({"observer": "histogram"}, {"observer": "minmax"}, {"observer": "histogram", "fp32_ends": True}),
    )
)
register(
    Variant(
        "onnx-int8",
        ".onnx",
        "onnxruntime",
        "int8",
        ("cpu",),
        _onnx_int8,
        recipes=(
            {"calibration_method": "minmax"},
            {"calibration_method": "percentile"},
            {"calibration_method": "entropy"},
            {"calibration_method": "minmax", "fp32_ends": True},
        ),
    )
)

VARIANTS = tuple(REGISTRY)  # the built-in ones, in build order (onnx-fp32 before onnx-int8)
