"""``export_run``: checkpoint -> ``artifacts/<RUN>/`` with four variants, gates and ``manifest.json``.

Steps, top to bottom:
1. rebuild the trained model from ``runs/<RUN>/best.pt`` (the one model registry, ``training.models``);
2. load held-out pixels (the test split of the checkpoint's dataset) and calibration pixels (training
   split, no augmentation) as uint8;
3. build every variant into a private staging folder and write a staging manifest;
4. load each variant back through ``export.runtime.load_variant`` (the server's loader) and measure
   parity against eager and held-out accuracy;
5. gates: fp32 variants agree with eager on every check image within ``atol``; INT8 variants keep
   accuracy within ``max_int8_drop`` points of eager fp32. Any failure raises ``GateError`` and
   publishes nothing;
6. latency per variant (1 and 2 threads), the CPU default chosen by measurement;
7. publish: each file copied into ``artifacts/<RUN>/`` atomically, the manifest last.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from export import variants as V
from export.data import Pixels, load_pixels
from export.measure import accuracy, eager_predict, latency, parity, predict_all
from export.runtime import (MANIFEST_FORMAT, MANIFEST_NAME, VARIANTS, load_variant, read_manifest,
                            sha256_file, verify_file)
from training.checkpoint import atomic_write_bytes, load_checkpoint, model_from_checkpoint, provenance

FP32_VARIANTS = ("torchscript-fp32", "onnx-fp32")
INT8_VARIANTS = ("torchscript-int8", "onnx-int8")
# What each variant is: file suffix, runtime, precision, devices it can run on. The INT8 TorchScript
# model uses oneDNN/fbgemm quantized kernels, which exist on CPU only.
VARIANT_INFO = {
    "torchscript-fp32": (".pt", "torchscript", "fp32", ["cpu", "cuda"]),
    "onnx-fp32": (".onnx", "onnxruntime", "fp32", ["cpu", "cuda"]),
    "torchscript-int8": (".pt", "torchscript", "int8", ["cpu"]),
    "onnx-int8": (".onnx", "onnxruntime", "int8", ["cpu"]),
}


class GateError(RuntimeError):
    """A variant failed a parity or accuracy gate; the message names the variant and its numbers."""


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``export_run`` needs, parsed once at the edge (CLI)."""

    run: str
    runs_dir: str = "runs"
    out_dir: str = "artifacts"
    checkpoint: str | None = None        # default: <runs_dir>/<run>/best.pt
    data_dir: str | None = None          # default: the checkpoint's training data_dir
    variants: tuple[str, ...] = VARIANTS
    calib_size: int = 512                # training images for INT8 calibration
    check_size: int = 1000               # held-out images for the fp32 parity gate
    eval_size: int = 0                   # held-out images for accuracy; 0 = the whole test split
    max_int8_drop: float = 1.0           # accuracy points INT8 may lose against eager fp32
    atol: float = 1e-3                   # max |logit - eager logit| for fp32 variants
    quant_backend: str = "x86"           # torch.ao.quantization backend / qconfig
    ort_reduce_range: bool = True        # 7-bit ORT weights (see variants.quantize_onnx)
    ort_activation: str = "uint8"        # ORT activation type: uint8 (U8S8) or int8 (S8S8)
    latency_threads: tuple[int, ...] = (1, 2)
    latency_rounds: int = 20             # 0 skips latency (smoke tests)
    cpu_default: str | None = None       # None: the fastest variant that passed its gates
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"unknown variants {unknown or '(none)'}; choose from {', '.join(VARIANTS)}")
        if self.cpu_default is not None and self.cpu_default not in self.variants:
            raise ValueError(f"--cpu-default {self.cpu_default} is not among the exported variants "
                             f"{', '.join(self.variants)}")
        for name in ("calib_size", "check_size", "eval_size", "latency_rounds"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if any(t < 1 for t in self.latency_threads):
            raise ValueError(f"latency threads must be >= 1, got {self.latency_threads}")
        if self.ort_activation not in ("uint8", "int8"):
            raise ValueError(f"ort activation type must be uint8 or int8, got {self.ort_activation!r}")

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(self.runs_dir) / self.run / "best.pt"


@dataclass
class Source:
    """The trained model and the data export measures it on."""

    model: torch.nn.Module
    contract: object
    ckpt: dict
    path: Path
    sha256: str
    heldout: Pixels
    calibration: Pixels | None
    check_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def export_run(cfg: ExportConfig, log: Callable[[str], None] = print) -> dict:
    """Export ``cfg.run``; returns the published manifest. Raises GateError when a gate fails."""
    src = load_source(cfg)
    eager = eager_predict(src.model, src.contract)
    eager_logits = predict_all(eager, src.heldout.images)
    eager_acc = accuracy(eager_logits, src.heldout.labels)
    log(f"{cfg.run}: eager fp32 accuracy {eager_acc:.4f} on {len(src.heldout)} held-out images "
        f"({src.ckpt['dataset']} test split)")

    out = Path(cfg.out_dir) / cfg.run
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{cfg.run}.staging-"))
    try:
        entries = build_variants(cfg, src, staging, log)
        manifest = make_manifest(cfg, src, entries, eager_acc)
        write_json(staging / MANIFEST_NAME, manifest)
        for name in entries:  # through the server's loader: sha256 check, then the real runtime
            logits = predict_all(load_variant(staging, name), src.heldout.images)
            entries[name]["parity"] = parity(eager_logits[src.check_idx], logits[src.check_idx])
            entries[name]["accuracy"] = accuracy(logits, src.heldout.labels)
            log(f"{cfg.run}: {name:17s} accuracy {entries[name]['accuracy']:.4f}  "
                f"top-1 agreement {entries[name]['parity']['top1_agreement']:.4f}  "
                f"max |diff| {entries[name]['parity']['max_abs_diff']:.2e}  {entries[name]['bytes']:,} bytes")
        failures = check_gates(entries, eager_acc, cfg)
        if failures:
            raise GateError(f"export {cfg.run} failed: " + "; ".join(failures)
                            + " (nothing was published)")
        if cfg.latency_rounds:
            manifest["baseline"]["latency"] = measure_latency(cfg, src, staging, entries, log)
        manifest["default_variant"] = {"cpu": choose_cpu_default(cfg, entries),
                                       "cuda": "torchscript-fp32" if "torchscript-fp32" in entries
                                       else "onnx-fp32" if "onnx-fp32" in entries else None}
        publish(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"{cfg.run}: wrote {out / MANIFEST_NAME} (version {manifest['version']}, "
        f"cpu default {manifest['default_variant']['cpu']})")
    return manifest


def load_source(cfg: ExportConfig) -> Source:
    path = cfg.checkpoint_path
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; train it first: make train RUN={cfg.run}")
    ckpt = load_checkpoint(path)
    model, contract = model_from_checkpoint(ckpt)
    train_cfg = ckpt.get("config", {})
    data_dir = cfg.data_dir or train_cfg.get("data_dir")
    kw = dict(dataset=ckpt["dataset"], data_dir=data_dir, contract=contract, seed=cfg.seed,
              image_size=train_cfg.get("image_size"))
    heldout = load_pixels(split="test", limit=cfg.eval_size, **kw)
    needs_calibration = any(v in INT8_VARIANTS for v in cfg.variants)
    calibration = load_pixels(split="train", limit=cfg.calib_size, **kw) if needs_calibration else None
    if needs_calibration and not cfg.calib_size:
        raise ValueError("INT8 variants need calibration images: --calib-size must be > 0")
    rng = np.random.default_rng(cfg.seed)
    n_check = len(heldout) if not cfg.check_size else min(cfg.check_size, len(heldout))
    check_idx = np.sort(rng.permutation(len(heldout))[:n_check])
    return Source(model, contract, ckpt, path, sha256_file(path), heldout, calibration, check_idx)


def build_variants(cfg: ExportConfig, src: Source, staging: Path, log) -> dict[str, dict]:
    """Write each requested variant into ``staging``; returns manifest entries without measurements."""
    entries: dict[str, dict] = {}
    onnx_fp32 = staging / "onnx-fp32.onnx"
    for name in VARIANTS:
        if name not in cfg.variants:
            continue
        suffix, runtime, precision, devices = VARIANT_INFO[name]
        path = staging / f"{name}{suffix}"
        log(f"{cfg.run}: building {name}")
        if name == "torchscript-fp32":
            V.export_torchscript(src.model, src.contract, path)
        elif name == "onnx-fp32":
            V.export_onnx(src.model, src.contract, path)
        elif name == "torchscript-int8":
            quantized = V.quantize_torch(src.model, src.contract, src.calibration.images, cfg.quant_backend)
            V.export_torchscript(quantized, src.contract, path)
        elif name == "onnx-int8":
            if not onnx_fp32.exists():  # onnx-int8 alone: quantize from a temporary fp32 graph
                V.export_onnx(src.model, src.contract, onnx_fp32)
            V.quantize_onnx(onnx_fp32, src.calibration.images, path, reduce_range=cfg.ort_reduce_range,
                            activation_type=cfg.ort_activation)
        entries[name] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                         "runtime": runtime, "precision": precision, "devices": devices, "latency": {}}
    if "onnx-fp32" not in cfg.variants and onnx_fp32.exists():
        onnx_fp32.unlink()
    return entries


def check_gates(entries: dict[str, dict], eager_acc: float, cfg: ExportConfig) -> list[str]:
    """One message per failed gate, naming the variant and its numbers."""
    failures = []
    for name, e in entries.items():
        p = e["parity"]
        if name in FP32_VARIANTS and (p["top1_agreement"] < 1.0 or p["max_abs_diff"] > cfg.atol):
            failures.append(f"{name} parity: top-1 agreement {p['top1_agreement']:.4f} (need 1.0), "
                            f"max |logit diff| {p['max_abs_diff']:.3g} (allowed {cfg.atol:g}) on "
                            f"{p['samples']} held-out images")
        if name in INT8_VARIANTS:
            drop = (eager_acc - e["accuracy"]) * 100.0
            if drop > cfg.max_int8_drop:
                failures.append(f"{name} accuracy {e['accuracy']:.4f} is {drop:.2f} points below eager fp32 "
                                f"{eager_acc:.4f} (allowed drop {cfg.max_int8_drop:g} points)")
    return failures


def measure_latency(cfg: ExportConfig, src: Source, staging: Path, entries: dict, log) -> dict:
    """Latency of eager fp32 and every variant, per thread count; stores it in ``entries``.

    Returns the eager baseline's numbers ({"threads_N": {...}}).
    """
    table = latency_table(staging, list(entries), src.model, src.contract, cfg.latency_threads,
                          cfg.latency_rounds, cfg.seed)
    baseline = {}
    for key, numbers in table.items():
        baseline[key] = numbers.pop("eager-fp32")
        for name, n in numbers.items():
            entries[name]["latency"][key] = n
        log(f"{cfg.run}: latency, {key.split('_')[1]} thread(s): " + ", ".join(
            f"{name} {n['batch1_p50_ms']:.3f} ms b1 / {n['batch64_images_per_s']:,.0f} img/s b64"
            for name, n in {"eager-fp32": baseline[key], **numbers}.items()))
    return baseline


def latency_table(artifact_dir: Path, names: list[str], model: torch.nn.Module, contract,
                  threads_list: tuple[int, ...], rounds: int, seed: int = 0) -> dict[str, dict]:
    """{"threads_N": {"eager-fp32": {...}, variant: {...}}}: eager and each variant (loaded through
    ``load_variant``) measured side by side at each thread count. Also used by bench/bench_export.py."""
    saved_threads = torch.get_num_threads()
    table = {}
    try:
        for threads in threads_list:
            torch.set_num_threads(threads)  # eager and TorchScript; ORT sessions get their own count
            predicts = {"eager-fp32": eager_predict(model, contract)}
            predicts.update({name: load_variant(artifact_dir, name, threads=threads) for name in names})
            table[f"threads_{threads}"] = latency(predicts, contract, rounds=rounds, seed=seed)
    finally:
        torch.set_num_threads(saved_threads)
    return table


def choose_cpu_default(cfg: ExportConfig, entries: dict[str, dict]) -> str:
    """The variant with the lowest single-thread batch-1 p50 among those that passed their gates.

    Every variant here passed the gates, i.e. keeps accuracy (fp32: identical top-1; INT8: within
    ``max_int8_drop`` points). Single-thread batch 1 because a TorchServe worker answers one request
    at a time on one thread by default. Without latency numbers, onnx-fp32 (exact, and fastest in
    every measurement in docs/benchmarks.md).
    """
    if cfg.cpu_default:
        return cfg.cpu_default
    timed = {n: e["latency"][f"threads_{min(cfg.latency_threads)}"]["batch1_p50_ms"]
             for n, e in entries.items() if e["latency"]}
    if timed:
        return min(timed, key=timed.get)
    return "onnx-fp32" if "onnx-fp32" in entries else next(iter(entries))


def make_manifest(cfg: ExportConfig, src: Source, entries: dict, eager_acc: float) -> dict:
    ckpt = src.ckpt
    import onnx
    import onnxruntime

    return {
        "format": MANIFEST_FORMAT,
        "name": cfg.run,
        # <epoch>.<checkpoint hash>: changes whenever the trained weights do.
        "version": f"{ckpt.get('epoch', 0)}.{src.sha256[:8]}",
        "contract": src.contract.to_dict(),
        "source": {"checkpoint": str(src.path), "sha256": src.sha256, "arch": ckpt["arch"],
                   "arch_args": ckpt["arch_args"], "dataset": ckpt["dataset"], "epoch": ckpt.get("epoch"),
                   "metrics": ckpt.get("metrics", {}), "provenance": ckpt.get("provenance", {})},
        "provenance": {**provenance(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                       "cpu": cpu_name(), "export_config": _jsonable(asdict(cfg))},
        "heldout": {"dataset": ckpt["dataset"], "split": "test", "samples": len(src.heldout),
                    "check_samples": int(len(src.check_idx))},
        "baseline": {"variant": "eager-fp32", "accuracy": eager_acc},
        "gates": {"fp32_top1_agreement": 1.0, "fp32_atol": cfg.atol, "int8_max_drop_points": cfg.max_int8_drop},
        "default_variant": {"cpu": None, "cuda": None},
        "variants": entries,
    }


def publish(staging: Path, out: Path, manifest: dict) -> None:
    """Copy each variant into ``out`` atomically, then the manifest, then verify what landed."""
    for name, e in manifest["variants"].items():
        data = (staging / e["file"]).read_bytes()
        atomic_write_bytes(out / e["file"], lambda f, d=data: f.write(d))
    write_json(out / MANIFEST_NAME, manifest)
    published = read_manifest(out)
    for e in published["variants"].values():
        verify_file(out / e["file"], e["sha256"])


def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


# The x86 features that move these numbers: INT8 kernels saturate on AVX2 without VNNI (hence
# reduce_range), and AVX-512/VNNI machines run the same variants 2-3x faster. Named in every report.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_name(cpuinfo: str | None = None) -> str:
    """"<model name> (<n> logical CPUs; <ISA flags>)" from /proc/cpuinfo (or the text given)."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return platform.processor() or platform.machine()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    isa = ", ".join(f for f in ISA_FLAGS if f in flags) or "no AVX2"
    return f"{model or platform.machine()} ({os.cpu_count()} logical CPUs; {isa})"


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
