"""The machine a number was measured on: every benchmark and every self-check log names it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The x86 features that move these numbers: INT8 kernels saturate on AVX2 without VNNI (hence
# reduce_range), and AVX-512/VNNI machines run the same variants 2-3x faster. Named in every report.
# bf16 training speed moves with avx512_bf16 / amx_bf16.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


# bf16 matrix units: without them PyTorch emulates bf16 on the CPU, far slower than fp32 (bn_cnn and
# resnet8 steps ran at 1/11-1/12 of fp32's images/s on AVX2 alone; docs/benchmarks.md, step ceiling).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo(cpuinfo: str | None) -> tuple[str | None, set[str]] | None:
    """(model name, flags) of the first CPU in /proc/cpuinfo (or the text given); None if unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return None
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def cpu_name(cpuinfo: str | None = None) -> str:
    """ "<model name> (<n> logical CPUs; <ISA flags>)" from /proc/cpuinfo (or the text given)."""
    info = _cpuinfo(cpuinfo)
    if info is None:
        return platform.processor() or platform.machine()
    model, flags = info
    isa = ", ".join(f for f in ISA_FLAGS if f in flags) or "no AVX2"
    return f"{model or platform.machine()} ({os.cpu_count()} logical CPUs; {isa})"


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware (``NATIVE_BF16_FLAGS``)."""
    info = _cpuinfo(cpuinfo)
    return info is not None and any(f in info[1] for f in NATIVE_BF16_FLAGS)
