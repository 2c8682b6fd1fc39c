"""Build the four exported variants of a trained model, each as one file taking uint8 NCHW pixels.

- torchscript-fp32: traced then frozen (constants folded; reloads exactly; ``optimize_for_inference``
  is not used because its saved file fails to reload on torch 2.14).
- onnx-fp32: ``torch.onnx.export(dynamo=True)``, one self-contained file, dynamic batch dimension.
- torchscript-int8: FX-mode static post-training quantization (``torch.ao.quantization``), traced and
  frozen. FX rather than eager mode because the registry's models use functional ReLU / pooling and
  residual adds, which eager mode cannot quantize without editing the model classes.
- onnx-int8: ONNX Runtime ``quantize_static`` (QDQ, per-channel weights, MinMax calibration) on the
  fp32 graph after ``quant_pre_process``.

Normalisation stays in float in front of every graph (``WithPreprocessing``), so the INT8 models
quantize the network, not the preprocessing constants.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.contract import Contract, WithPreprocessing

ONNX_OPSET = 20
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


@contextmanager
def quiet_deprecations():
    """TorchScript and torch.ao.quantization print a deprecation warning on every call; export uses
    them on purpose (they are what TorchServe and this torch version run), so keep the log readable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        yield


def example_pixels(contract: Contract, n: int = 2) -> torch.Tensor:
    """A uint8 example batch for tracing; batch 2 so the exporters keep the batch dimension dynamic."""
    return torch.randint(
        0, 256, (n, *contract.input_shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def export_torchscript(model: nn.Module, contract: Contract, path: Path) -> None:
    """Trace ``WithPreprocessing(model)`` on uint8 pixels, freeze, save. ``model`` may be quantized."""
    wrapped = WithPreprocessing(model, contract).eval()
    with quiet_deprecations(), torch.inference_mode():
        traced = torch.jit.trace(wrapped, example_pixels(contract), check_trace=False)
        torch.jit.freeze(traced).save(str(path))


def export_onnx(model: nn.Module, contract: Contract, path: Path) -> None:
    """ONNX fp32 with a dynamic batch dimension, weights inside the one file; checked by onnx.checker."""
    import onnx

    wrapped = WithPreprocessing(model, contract).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The dynamo exporter prints its progress to stdout; the export log has its own lines.
    with quiet_deprecations(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            wrapped,
            (example_pixels(contract),),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def end_layers(model: nn.Module) -> list[str]:
    """Names of the first and the last conv/linear layer: the ones INT8 hurts most (the input layer
    sees raw pixel statistics, the last one produces the logits)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return list(dict.fromkeys(names[:1] + names[-1:]))


def quantize_torch(
    model: nn.Module,
    contract: Contract,
    calibration: np.ndarray,
    backend: str = "x86",
    observer: str = "histogram",
    fp32_ends: bool = False,
) -> nn.Module:
    """FX static PTQ of the float model, calibrated on uint8 training pixels (normalised here).

    The ``x86`` qconfig observes activations with ``reduce_range=True`` (7-bit), which keeps the
    u8 x s8 kernels of CPUs without VNNI from saturating; weights are per channel.

    Args:
        observer: activation ranges from a histogram (the qconfig's default, clips outliers) or
            "minmax" (the full observed range).
        fp32_ends: keep the first and last conv/linear layers in fp32 (``end_layers``).
    """
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import MinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if observer not in ("histogram", "minmax"):
        raise ValueError(f"observer must be histogram or minmax, got {observer!r}")
    torch.backends.quantized.engine = backend
    mapping = get_default_qconfig_mapping(backend)
    if observer == "minmax":
        default = mapping.global_qconfig
        mapping.set_global(QConfig(activation=MinMaxObserver.with_args(reduce_range=True), weight=default.weight))
    if fp32_ends:
        for name in end_layers(model):
            mapping.set_module_name(name, None)
    normalize = WithPreprocessing(nn.Identity(), contract).normalize
    with quiet_deprecations():
        prepared = prepare_fx(_copy(model).eval(), mapping, (normalize(example_pixels(contract)),))
        with torch.inference_mode():
            for batch in np.array_split(calibration, max(1, len(calibration) // 64)):
                prepared(normalize(torch.from_numpy(batch)))
        return convert_fx(prepared).eval()


def quantize_onnx(
    fp32_path: Path,
    calibration: np.ndarray,
    path: Path,
    reduce_range: bool = True,
    activation_type: str = "uint8",
    calibration_method: str = "minmax",
    fp32_ends: bool = False,
) -> None:
    """ORT static INT8: pre-process the fp32 graph, then QDQ per-channel quantization.

    Args:
        reduce_range: 7-bit weights. Without it the u8 x s8 kernels saturate on AVX2 CPUs without
            VNNI (this machine) and accuracy drops; measured, see README "Export".
        activation_type: "uint8" (U8S8, ORT's fast path on x86) or "int8" (S8S8).
        calibration_method: "minmax", "percentile" (99.999th) or "entropy" (KL divergence).
        fp32_ends: keep the first and last Conv/Gemm/MatMul nodes in fp32.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(np.array_split(calibration, max(1, len(calibration) // 64)))

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}

    import onnx

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if calibration_method not in methods:
        raise ValueError(f"calibration method must be one of {sorted(methods)}, got {calibration_method!r}")
    activation = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation_type]
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepped))
        except TypeError:
            # ORT's symbolic shape inference gives up on the flip of a flip-TTA graph (a Slice with step
            # -1); ONNX's own shape inference, which it then runs alone, is enough for a conv net.
            quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        exclude = []
        if fp32_ends:
            weighted = [n.name for n in onnx.load(str(prepped)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
            exclude = list(dict.fromkeys(weighted[:1] + weighted[-1:]))
        quantize_static(
            str(prepped),
            str(path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=activation,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[calibration_method],
            nodes_to_exclude=exclude,
        )


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
