"""``export_run``: checkpoint -> ``artifacts/<RUN>/`` with four variants, gates and ``manifest.json``.

Steps, top to bottom:
1. rebuild the trained model from ``runs/<RUN>/best.pt`` (the one model registry, ``training.models``);
2. load held-out pixels (the test split of the checkpoint's dataset) and calibration pixels (training
   split, no augmentation) as uint8;
3. build every variant into a private staging folder and write a staging manifest;
4. load each variant back through ``export.runtime.load_variant`` (the server's loader) and measure
   parity against eager and held-out accuracy;
5. gates: fp32 variants agree with eager on every check image within ``atol`` (a failure raises
   ``GateError`` and publishes nothing: an fp32 graph that disagrees is a bug); INT8 variants keep
   accuracy within ``max_int8_drop`` points of eager fp32. An INT8 variant that misses is rebuilt with
   the registry's next recipe (calibration method, fp32 first/last layers) until one passes; if none
   does it is *rejected*: recorded in the manifest with its numbers and the recipes tried, never
   published or served, and one warning line is logged (``strict`` makes it a ``GateError``);
6. latency per published variant (1 and 2 threads), the CPU default chosen by measurement;
7. publish: each file copied into ``artifacts/<RUN>/`` atomically, the manifest last.

Before step 3 the out-of-distribution detector (``export.ood``) is fitted on eager fp32's penultimate
features of the training split (a seeded subset, the validation share excluded), its threshold set on
the validation split at ``ood_acceptance``, and saved as ``ood.npz``; every variant is built with the
features as a second output, and its scores are measured against eager's like its logits are.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from export import ood, registry
from export.calibrate import ECE_BINS, calibration_report
from export.data import Pixels, load_pixels
from export.measure import accuracy, eager_predict, latency, parity, predict_all
from export.ood import Detector
from export.registry import REGISTRY, VARIANTS, BuildContext
from export.runtime import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    REFERENCE_NAME,
    Reference,
    load_variant,
    read_manifest,
    reference_check,
    save_reference,
    sha256_file,
    verify_file,
)
from training.checkpoint import load_checkpoint, model_from_checkpoint, provenance
from training.contract import Contract, WithPreprocessing
from training.files import atomic_write_bytes, atomic_write_json
from training.machine import cpu_name


class GateError(RuntimeError):
    """A variant failed a parity or accuracy gate; the message names the variant and its numbers."""


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``export_run`` needs, parsed once at the edge (CLI)."""

    run: str
    runs_dir: str = "runs"
    out_dir: str = "artifacts"
    checkpoint: str | None = None  # default: <runs_dir>/<run>/best.pt
    data_dir: str | None = None  # default: the checkpoint's training data_dir
    variants: tuple[str, ...] = VARIANTS
    calib_size: int = 512  # training images for INT8 calibration
    check_size: int = 1000  # held-out images for the fp32 parity gate
    reference_size: int = 256  # of those, shipped as the reference batch every worker checks
    val_size: int = 0  # validation images the temperature is fitted on; 0 = all
    eval_size: int = 0  # held-out images for accuracy; 0 = the whole test split
    max_int8_drop: float = 1.0  # accuracy points INT8 may lose against eager fp32
    atol: float = 1e-3  # max |logit - eager logit| for fp32 variants
    quant_backend: str = "x86"  # torch.ao.quantization backend / qconfig
    ort_reduce_range: bool = True  # 7-bit ORT weights (see variants.quantize_onnx)
    ort_activation: str = "uint8"  # ORT activation type: uint8 (U8S8) or int8 (S8S8)
    latency_threads: tuple[int, ...] = (1, 2)
    latency_rounds: int = 20  # 0 skips latency (smoke tests)
    cpu_default: str | None = None  # None: the fastest variant that passed its gates
    strict: bool = False  # an INT8 variant rejected by its gate fails the export
    ood_method: str = ood.DEFAULT_METHOD  # the out-of-distribution score (export.ood.METHODS) or "none"
    ood_acceptance: float = ood.DEFAULT_ACCEPTANCE  # validation images the ood threshold accepts
    ood_fit_size: int = 5000  # training images the detector is fitted on (0: all)
    ood_knn_k: int = ood.DEFAULT_KNN_K  # the neighbour the knn method measures to
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in REGISTRY]
        if unknown or not self.variants:
            raise ValueError(f"unknown variants {unknown or '(none)'}; choose from {', '.join(REGISTRY)}")
        if self.cpu_default is not None and self.cpu_default not in self.variants:
            raise ValueError(
                f"--cpu-default {self.cpu_default} is not among the exported variants {', '.join(self.variants)}"
            )
        for name in ("calib_size", "check_size", "reference_size", "val_size", "eval_size", "latency_rounds"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if any(t < 1 for t in self.latency_threads):
            raise ValueError(f"latency threads must be >= 1, got {self.latency_threads}")
        if self.ort_activation not in ("uint8", "int8"):
            raise ValueError(f"ort activation type must be uint8 or int8, got {self.ort_activation!r}")
        if self.ood_method not in (*ood.METHODS, "none"):
            raise ValueError(f"--ood-method must be one of {', '.join(ood.METHODS)} or none, got {self.ood_method!r}")
        if not 0.5 <= self.ood_acceptance < 1.0:
            raise ValueError(
                f"--ood-acceptance is the share of in-distribution images accepted, from 0.5 "
                f"to below 1, got {self.ood_acceptance}"
            )
        if self.ood_fit_size < 0 or self.ood_knn_k < 1:
            raise ValueError(
                f"--ood-fit-size must be >= 0 and --ood-knn-k >= 1, got {self.ood_fit_size}, {self.ood_knn_k}"
            )

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(self.runs_dir) / self.run / "best.pt"


@dataclass
class Source:
    """The trained model and the data export measures it on."""

    model: torch.nn.Module
    contract: Contract
    ckpt: dict
    path: Path
    sha256: str
    heldout: Pixels
    calibration: Pixels | None
    validation: Pixels | None  # the checkpoint's val split (temperature fitting)
    ood_fit: Pixels | None = None  # training images the ood detector is fitted on
    check_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ref_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    reference: dict = field(default_factory=dict)  # the manifest's "reference" entry
    ood: dict = field(default_factory=dict)  # the manifest's "ood" entry ({} without a detector)
    detector: Detector | None = None


def export_run(cfg: ExportConfig, log: Callable[[str], None] = print) -> dict:
    """Export ``cfg.run``; returns the published manifest.

    Raises:
        GateError: an fp32 variant disagrees with eager, no variant passed, or (``strict``) an INT8
            variant was rejected.
    """
    src = load_source(cfg)
    eager = eager_predict(src.model, src.contract)
    eager_logits = predict_all(eager, src.heldout.images)
    eager_acc = accuracy(eager_logits, src.heldout.labels)
    log(
        f"{cfg.run}: eager fp32 accuracy {eager_acc:.4f} on {len(src.heldout)} held-out images "
        f"({src.ckpt['dataset']} test split)"
    )
    calibration = fit_calibration(src, eager, eager_logits, log)

    out = Path(cfg.out_dir) / cfg.run
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{cfg.run}.staging-"))
    try:
        eager_scores = fit_ood(cfg, src, calibration["temperature"], staging, log)
        src.reference = write_reference(src, eager_logits, staging, eager_scores)
        model = src.model if src.detector is None else ood.with_features(src.model)  # (logits, features)
        ctx = BuildContext(model, src.contract, src.calibration.images if src.calibration else None, staging, cfg)
        entries, rejected = {}, {}
        for name in (n for n in REGISTRY if n in cfg.variants):  # registry order: fp32 graphs first
            entry, failure = build_and_gate(name, ctx, src, eager_logits, eager_scores, eager_acc, cfg, log)
            if failure is None:
                entries[name] = entry
            else:
                rejected[name] = {**entry, "reason": failure}
        fp32_failures = [f"{n}: {r['reason']}" for n, r in rejected.items() if REGISTRY[n].precision == "fp32"]
        if fp32_failures or not entries:
            raise GateError(
                f"export {cfg.run} failed: "
                + "; ".join(fp32_failures or [f"{n}: {r['reason']}" for n, r in rejected.items()])
                + " (nothing was published)"
            )
        for name, r in rejected.items():
            log(
                f"warning: {cfg.run}: {name} rejected, not published: {r['reason']} "
                f"(tried {len(r['recipes_tried'])} recipes)"
            )
        if rejected and cfg.strict:
            raise GateError(
                f"export {cfg.run} failed (--strict): "
                + "; ".join(f"{n}: {r['reason']}" for n, r in rejected.items())
                + " (nothing was published)"
            )
        manifest = make_manifest(cfg, src, entries, eager_acc)
        manifest["calibration"] = calibration
        manifest["rejected"] = {
            n: {k: v for k, v in r.items() if k not in ("file", "sha256")} for n, r in rejected.items()
        }
        atomic_write_json(staging / MANIFEST_NAME, manifest)
        if cfg.latency_rounds:
            manifest["baseline"]["latency"] = measure_latency(cfg, src, staging, entries, log)
        manifest["default_variant"] = {"cpu": choose_cpu_default(cfg, entries), "cuda": registry.cuda_default(entries)}
        publish(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(
        f"{cfg.run}: wrote {out / MANIFEST_NAME} (version {manifest['version']}, "
        f"cpu default {manifest['default_variant']['cpu']}"
        + (f", rejected {', '.join(manifest['rejected'])}" if manifest["rejected"] else "")
        + ")"
    )
    return manifest


def fit_calibration(src: Source, eager, eager_logits: np.ndarray, log) -> dict:
    """The temperature the served probabilities use (export.calibrate), fitted on the checkpoint's
    validation split, with ECE/NLL before and after on the held-out test images."""
    if src.validation is None or not len(src.validation):
        log(
            f"warning: {src.path}: trained without a validation split (val_fraction 0): temperature 1 "
            f"(probabilities uncalibrated)"
        )
        return {"temperature": 1.0, "fitted_on": None, "ece_bins": ECE_BINS, "test": None}
    report = calibration_report(
        predict_all(eager, src.validation.images),
        src.validation.labels,
        eager_logits,
        src.heldout.labels,
        {"dataset": src.ckpt["dataset"], "split": "val"},
    )
    t = report["test"]
    log(
        f"calibration: temperature {report['temperature']:.3f} fitted on {report['fitted_on']['samples']} "
        f"validation images; test ECE ({ECE_BINS} bins) {t['ece_before']:.4f} -> {t['ece_after']:.4f}, "
        f"NLL {t['nll_before']:.4f} -> {t['nll_after']:.4f} on {t['samples']} images"
    )
    return report


def build_and_gate(
    name: str,
    ctx: BuildContext,
    src: Source,
    eager_logits: np.ndarray,
    eager_scores: np.ndarray | None,
    eager_acc: float,
    cfg: ExportConfig,
    log,
) -> tuple[dict, str | None]:
    """Build ``name`` with each of its recipes in turn until one passes its gate.

    Returns (manifest entry with the measurements and the recipe chosen or all tried, None) when it
    passed, or (entry of the last attempt, the gate's reason) when every recipe failed.
    """
    variant = registry.get(name)
    path = ctx.staging / f"{name}{variant.suffix}"
    tried = []
    for recipe in variant.recipes:
        log(f"{cfg.run}: building {name}" + (f" ({_recipe_text(recipe)})" if recipe else ""))
        variant.build(ctx, path, recipe)
        entry: dict = {
            "file": path.name,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "runtime": variant.runtime,
            "precision": variant.precision,
            "devices": list(variant.devices),
            "recipe": recipe,
            "latency": {},
        }
        # measured through the server's loader: sha256 check, then the real runtime
        atomic_write_json(ctx.staging / MANIFEST_NAME, make_manifest(cfg, src, {name: entry}, eager_acc))
        logits, scores = infer_all(load_variant(ctx.staging, name), src.heldout.images)
        entry["parity"] = parity(eager_logits[src.check_idx], logits[src.check_idx])
        entry["accuracy"] = accuracy(logits, src.heldout.labels)
        if scores is not None:  # a variant scores only when export fitted a detector
            assert src.detector is not None and eager_scores is not None
            entry["ood"] = ood_parity(src.detector, eager_scores, scores)
        # the check every serving worker repeats on its own machine (export.runtime.reference_check)
        reference = Reference(
            src.heldout.images[src.ref_idx],
            src.heldout.labels[src.ref_idx],
            eager_logits[src.ref_idx],
            None if eager_scores is None else eager_scores[src.ref_idx],
        )
        entry["reference_check"], ref_failure = reference_check(
            logits[src.ref_idx],
            reference,
            variant.precision,
            export_gates(cfg, src),
            None if scores is None else scores[src.ref_idx],
            None if src.detector is None else src.detector.threshold,
        )
        log(
            f"{cfg.run}: {name:17s} accuracy {entry['accuracy']:.4f}  "
            f"top-1 agreement {entry['parity']['top1_agreement']:.4f}  "
            f"max |diff| {entry['parity']['max_abs_diff']:.2e}  {entry['bytes']:,} bytes"
        )
        failure = gate_failure(name, entry, eager_acc, cfg) or (ref_failure and f"reference batch: {ref_failure}")
        tried.append({"recipe": recipe, "accuracy": entry["accuracy"], "passed": failure is None})
        if failure is None:
            entry["recipes_tried"] = tried
            return entry, None
    path.unlink(missing_ok=True)
    entry["recipes_tried"] = tried
    return entry, failure


def infer_all(runner, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """``runner.infer`` over all images in batches: (N, K) logits, (N,) ood scores or None."""
    parts = [runner.infer(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    scores = None if parts[0][1] is None else np.concatenate([s for _, s in parts])
    return np.concatenate([lg for lg, _ in parts]), scores


def ood_parity(detector: Detector, eager_scores: np.ndarray, scores: np.ndarray) -> dict:
    """A variant's ood scores on the held-out images against eager fp32's."""
    diff = np.abs(scores - eager_scores)
    return {
        "samples": len(scores),
        "max_score_diff": float(diff.max()),
        "max_score_diff_of_threshold": float(diff.max() / max(abs(detector.threshold), 1e-12)),
        "flag_agreement": float((detector.flags(scores) == detector.flags(eager_scores)).mean()),
        "heldout_ood_share": float(detector.flags(scores).mean()),
    }


def fit_ood(cfg: ExportConfig, src: Source, temperature: float, staging: Path, log) -> np.ndarray | None:
    """Fit the out-of-distribution detector on eager fp32 features of the training images, set its
    threshold on the validation split, save ``ood.npz`` in ``staging``; fills ``src.detector`` and
    ``src.ood`` (the manifest entry) and returns eager fp32's scores on the held-out images (None
    with ``ood_method`` none).

    Without a validation split (val_fraction 0) the threshold is set on a seeded fifth of the
    training images held back from the fit, never on the test split.
    """
    if cfg.ood_method == "none":
        return None
    eager = WithPreprocessing(ood.with_features(src.model), src.contract).eval()

    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        with torch.inference_mode():
            for i in range(0, len(images), 256):
                logits, features = eager(torch.from_numpy(images[i : i + 256]))
                parts.append((logits.float().numpy(), features.float().numpy()))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    fit = src.ood_fit
    assert fit is not None  # load_source loads it unless ood_method is none
    if src.validation is not None and len(src.validation):
        threshold_px, threshold_on = src.validation, {"dataset": src.ckpt["dataset"], "split": "val"}
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(fit))
        held = np.sort(order[: max(1, len(fit) // 5)])
        kept = np.sort(order[len(held) :])
        threshold_px = Pixels(fit.images[held], fit.labels[held])
        fit = Pixels(fit.images[kept], fit.labels[kept])
        threshold_on = {"dataset": src.ckpt["dataset"], "split": "train (held back from the fit: no val split)"}
    _, features = outputs(fit.images)
    detector = ood.fit_detector(
        cfg.ood_method, features, fit.labels, src.contract.num_classes, temperature, cfg.ood_knn_k
    )
    threshold_scores = detector.score(*outputs(threshold_px.images))
    detector = detector.with_threshold(ood.threshold_at(threshold_scores, cfg.ood_acceptance))
    heldout_scores = detector.score(*outputs(src.heldout.images))
    path = staging / ood.OOD_NAME
    ood.save_detector(path, detector)
    src.detector = detector
    src.ood = {
        "file": path.name,
        "sha256": sha256_file(path),
        "method": detector.method,
        "threshold": detector.threshold,
        "acceptance": cfg.ood_acceptance,
        "features": int(features.shape[1]),
        **({"k": detector.k} if detector.method == "knn" else {}),
        "fitted_on": {"dataset": src.ckpt["dataset"], "split": "train", "samples": len(fit), "seed": cfg.seed},
        "threshold_on": {
            **threshold_on,
            "samples": len(threshold_px),
            "accepted": float(1.0 - detector.flags(threshold_scores).mean()),
        },
        # the share of in-distribution images flagged (test split, eager fp32): the drift alert's baseline
        "heldout": {
            "dataset": src.ckpt["dataset"],
            "split": "test",
            "samples": len(src.heldout),
            "ood_share": float(detector.flags(heldout_scores).mean()),
        },
    }
    log(
        f"{cfg.run}: out-of-distribution detector {detector.method} on {src.ood['features']} features of "
        f"{len(fit)} training images; threshold {detector.threshold:.4g} accepts "
        f"{src.ood['threshold_on']['accepted']:.3f} of {len(threshold_px)} {threshold_on['split']} images, "
        f"flags {src.ood['heldout']['ood_share']:.3f} of {len(src.heldout)} test images"
    )
    return heldout_scores


def _recipe_text(recipe: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in recipe.items())


def load_source(cfg: ExportConfig) -> Source:
    path = cfg.checkpoint_path
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; train it first: make train RUN={cfg.run}")
    ckpt = load_checkpoint(path)
    model, contract = model_from_checkpoint(ckpt)
    train_cfg = ckpt.get("config", {})
    data_dir = cfg.data_dir or train_cfg.get("data_dir")
    kw = {
        "dataset": ckpt["dataset"],
        "data_dir": data_dir,
        "contract": contract,
        "seed": cfg.seed,
        "image_size": train_cfg.get("image_size"),
    }
    heldout = load_pixels(split="test", limit=cfg.eval_size, **kw)
    needs_calibration = any(REGISTRY[v].precision == "int8" for v in cfg.variants)
    calibration = load_pixels(split="train", limit=cfg.calib_size, **kw) if needs_calibration else None
    val_fraction = train_cfg.get("val_fraction", 0.0)
    validation = (
        load_pixels(
            split="val", limit=cfg.val_size, val_fraction=val_fraction, split_seed=train_cfg.get("seed", 0), **kw
        )
        if val_fraction
        else None
    )
    # the training split without its validation share: the detector's threshold is set on that share
    ood_fit = (
        None
        if cfg.ood_method == "none"
        else load_pixels(
            split="train", limit=cfg.ood_fit_size, val_fraction=val_fraction, split_seed=train_cfg.get("seed", 0), **kw
        )
    )
    if needs_calibration and not cfg.calib_size:
        raise ValueError("INT8 variants need calibration images: --calib-size must be > 0")
    rng = np.random.default_rng(cfg.seed)
    n_check = len(heldout) if not cfg.check_size else min(cfg.check_size, len(heldout))
    check_idx = np.sort(rng.permutation(len(heldout))[:n_check])
    # the reference batch: a seeded subset of the parity check images (fp32 variants already match there)
    ref_idx = np.sort(rng.permutation(check_idx)[: max(1, min(cfg.reference_size, len(check_idx)))])
    return Source(
        model, contract, ckpt, path, sha256_file(path), heldout, calibration, validation, ood_fit, check_idx, ref_idx
    )


def write_reference(
    src: Source, eager_logits: np.ndarray, staging: Path, eager_scores: np.ndarray | None = None
) -> dict:
    """Save the reference batch (images as served, labels, eager fp32 logits and ood scores); returns
    its manifest entry."""
    path = staging / REFERENCE_NAME
    idx = src.ref_idx
    save_reference(
        path,
        Reference(
            src.heldout.images[idx],
            src.heldout.labels[idx],
            eager_logits[idx],
            None if eager_scores is None else eager_scores[idx],
        ),
    )
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "samples": len(idx),
        "accuracy": accuracy(eager_logits[idx], src.heldout.labels[idx]),
    }


def gate_failure(name: str, entry: dict, eager_acc: float, cfg: ExportConfig) -> str | None:
    """Why ``name`` fails its gate (naming its numbers), or None when it passes."""
    p = entry["parity"]
    if registry.get(name).precision == "fp32":
        if p["top1_agreement"] < 1.0 or p["max_abs_diff"] > cfg.atol:
            return (
                f"parity: top-1 agreement {p['top1_agreement']:.4f} (need 1.0), max |logit diff| "
                f"{p['max_abs_diff']:.3g} (allowed {cfg.atol:g}) on {p['samples']} held-out images"
            )
        return None
    drop = (eager_acc - entry["accuracy"]) * 100.0
    if drop > cfg.max_int8_drop:
        return (
            f"accuracy {entry['accuracy']:.4f} is {drop:.2f} points below eager fp32 {eager_acc:.4f} "
            f"(allowed drop {cfg.max_int8_drop:g} points)"
        )
    return None


def measure_latency(cfg: ExportConfig, src: Source, staging: Path, entries: dict, log) -> dict:
    """Latency of eager fp32 and every variant, per thread count; stores it in ``entries``.

    Returns the eager baseline's numbers ({"threads_N": {...}}).
    """
    table = latency_table(
        staging, list(entries), src.model, src.contract, cfg.latency_threads, cfg.latency_rounds, cfg.seed
    )
    baseline = {}
    for key, numbers in table.items():
        baseline[key] = numbers.pop("eager-fp32")
        for name, n in numbers.items():
            entries[name]["latency"][key] = n
        log(
            f"{cfg.run}: latency, {key.split('_')[1]} thread(s): "
            + ", ".join(
                f"{name} {n['batch1_p50_ms']:.3f} ms b1 / {n['batch64_images_per_s']:,.0f} img/s b64"
                for name, n in {"eager-fp32": baseline[key], **numbers}.items()
            )
        )
    return baseline


def latency_table(
    artifact_dir: Path,
    names: list[str],
    model: torch.nn.Module,
    contract,
    threads_list: tuple[int, ...],
    rounds: int,
    seed: int = 0,
) -> dict[str, dict]:
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
    timed = {
        n: e["latency"][f"threads_{min(cfg.latency_threads)}"]["batch1_p50_ms"]
        for n, e in entries.items()
        if e["latency"]
    }
    if timed:
        return min(timed, key=timed.__getitem__)
    return "onnx-fp32" if "onnx-fp32" in entries else next(iter(entries))


def export_gates(cfg: ExportConfig, src: Source | None = None) -> dict:
    """The gates export applies, recorded in the manifest; every serving worker re-applies them.
    With a detector, on its scores too: fp32 within ``export.ood.FP32_SCORE_RTOL`` of the threshold;
    INT8 changing the flag of at most as many points of images as it may lose accuracy points."""
    gates = {"fp32_top1_agreement": 1.0, "fp32_atol": cfg.atol, "int8_max_drop_points": cfg.max_int8_drop}
    if src is not None and src.detector is not None:
        gates.update(
            ood_fp32_atol=ood.FP32_SCORE_RTOL * abs(src.detector.threshold),
            ood_int8_max_flag_change_points=cfg.max_int8_drop,
        )
    return gates


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
        "source": {
            "checkpoint": str(src.path),
            "sha256": src.sha256,
            "arch": ckpt["arch"],
            "arch_args": ckpt["arch_args"],
            "dataset": ckpt["dataset"],
            "epoch": ckpt.get("epoch"),
            "metrics": ckpt.get("metrics", {}),
            "provenance": ckpt.get("provenance", {}),
        },
        "provenance": {
            **provenance(),
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "cpu": cpu_name(),
            "export_config": _jsonable(asdict(cfg)),
        },
        "heldout": {
            "dataset": ckpt["dataset"],
            "split": "test",
            "samples": len(src.heldout),
            "check_samples": len(src.check_idx),
        },
        "baseline": {"variant": "eager-fp32", "accuracy": eager_acc},
        "reference": src.reference,
        **({"ood": src.ood} if src.ood else {}),
        "gates": export_gates(cfg, src),
        "default_variant": {"cpu": None, "cuda": None},
        "variants": entries,
    }


def publish(staging: Path, out: Path, manifest: dict) -> None:
    """Copy each variant into ``out`` atomically, then the manifest, then verify what landed."""
    files = [*manifest["variants"].values(), manifest["reference"], *([manifest["ood"]] if "ood" in manifest else [])]
    for e in files:
        data = (staging / e["file"]).read_bytes()
        atomic_write_bytes(out / e["file"], lambda f, d=data: f.write(d))
    atomic_write_json(out / MANIFEST_NAME, manifest)
    published = read_manifest(out)
    for e in [
        *published["variants"].values(),
        published["reference"],
        *([published["ood"]] if "ood" in published else []),
    ]:
        verify_file(out / e["file"], e["sha256"])


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
