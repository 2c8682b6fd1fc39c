"""Out-of-distribution detection: every method of export/ood.py on one trained model, against
inputs that are not its training data, and what the detector costs per image at serving.

    .venv/bin/python bench/bench_ood.py --run digits [--runs-dir runs] [--artifacts artifacts] [--json F]

For the checkpoint ``<runs-dir>/<run>/best.pt``:
  * each method is fitted as export fits it (eager fp32 penultimate features of the training split
    without its validation share; threshold on the validation split at 95 %; export.core.fit_ood's
    data, through export.core.load_source);
  * in-distribution: the test split; out-of-distribution sets by the model's contract:
      Fashion-MNIST test images (a seeded 2,000; 1-channel models not trained on it),
      scikit-learn's 8x8 digits test split, upscaled as the digits dataset is (1-channel models not
      trained on digits), 100x100 crops of scikit-learn's two sample photos through the server's own
      conversion (InferenceCore.to_pixels: resize, gray, auto-invert), uniform noise (500), blank
      and saturated images (the 256 constant levels);
  * per method and set: AUROC, FPR@95TPR (threshold at 95 % of the test split), and the share of the
    set accepted at the threshold export ships (set on the validation split);
  * with ``--artifacts``: the exported run's detector through every exported variant (the serving
    path, ``Runner.infer``), and the serving cost: ``InferenceCore.to_pixels`` + ``predict`` per image
    at batch 1 and 8, with and without the score, alternating call by call (``--cost-only``: just this).
Prints markdown; ``--json`` writes the numbers (atomically).
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from export import ood  # noqa: E402
from export.calibrate import ece, fit_temperature  # noqa: E402
from export.core import ExportConfig, load_source  # noqa: E402
from export.data import load_pixels  # noqa: E402
from serving.core import InferenceCore  # noqa: E402
from training.contract import WithPreprocessing  # noqa: E402
from training.files import atomic_write_json  # noqa: E402
from training.images import encode_png  # noqa: E402
from training.machine import cpu_name  # noqa: E402

FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")  # apt-get install dataset-fashion-mnist


def read_idx_images(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    n, h, w = (int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(3))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w)


def photo_crops(contract, size: int = 100) -> np.ndarray:
    """The 100x100 crops of scikit-learn's china.jpg and flower.jpg (427x640) on a 50-pixel grid (7 x 11
    each, 154 in all), converted as the server converts a posted image."""
    from sklearn.datasets import load_sample_images

    core = InferenceCore(type("Stub", (), {"contract": contract, "manifest": {}})())
    crops = []
    for img in load_sample_images().images:
        h, w = img.shape[:2]
        for y in range(0, h - size + 1, size // 2):
            for x in range(0, w - size + 1, size // 2):
                chw = np.ascontiguousarray(img[y:y + size, x:x + size].transpose(2, 0, 1))
                crops.append(core.to_pixels(encode_png(chw)))
    return np.stack(crops)


def ood_sets(dataset: str, contract, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = contract.input_shape
    sets: dict[str, np.ndarray] = {}
    if contract.channels == 1 and dataset != "fashion-mnist" and FASHION_TEST.is_file():
        fashion = read_idx_images(FASHION_TEST)
        sets["Fashion-MNIST"] = fashion[np.sort(rng.permutation(len(fashion))[:2000])]
    if contract.channels == 1 and dataset != "digits":
        from training.data import load_splits

        digits_contract = load_splits("digits", val_fraction=0.0, download=False).contract
        sets["digits (sklearn, upscaled)"] = load_pixels("digits", None, digits_contract, "test").images
    sets["photo crops"] = photo_crops(contract)
    sets["uniform noise"] = rng.integers(0, 256, (500, *shape), dtype=np.uint8)
    sets["blank / saturated"] = np.repeat(np.arange(256, dtype=np.uint8), int(np.prod(shape))).reshape(256, *shape)
    return sets


def eager_outputs(model, contract):
    wrapped = WithPreprocessing(ood.with_features(model), contract).eval()

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        with torch.inference_mode():
            for i in range(0, len(images), 256):
                logits, features = wrapped(torch.from_numpy(images[i:i + 256]))
                parts.append((logits.numpy(), features.numpy()))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return run


def compare_methods(src, sets: dict[str, np.ndarray], k: int, acceptance: float) -> dict:
    run = eager_outputs(src.model, src.contract)
    fit_logits, fit_features = run(src.ood_fit.images)
    val_logits, val_features = run(src.validation.images)
    test_logits, test_features = run(src.heldout.images)
    temperature = fit_temperature(val_logits, src.validation.labels)
    outs = {name: run(px) for name, px in sets.items()}
    table = {"_in_distribution": {"test_samples": len(src.heldout), "val_samples": len(src.validation),
                                  "fit_samples": len(src.ood_fit), "temperature": temperature,
                                  "accuracy": float((test_logits.argmax(1) == src.heldout.labels).mean()),
                                  "ece": ece(test_logits, src.heldout.labels, temperature)}}
    for method in ood.METHODS:
        det = ood.fit_detector(method, fit_features, src.ood_fit.labels, src.contract.num_classes, temperature, k)
        det = det.with_threshold(ood.threshold_at(det.score(val_logits, val_features), acceptance))
        s_in = det.score(test_logits, test_features)
        row = {"test_flagged": float(det.flags(s_in).mean())}
        for name, (lg, ft) in outs.items():
            s_out = det.score(lg, ft)
            row[name] = {"auroc": ood.auroc(s_in, s_out), "fpr95": ood.fpr_at_tpr(s_in, s_out, 0.95),
                         "accepted_at_shipped": float((~det.flags(s_out)).mean()), "samples": len(s_out)}
        table[method] = row
    return table


def variants_table(artifact_dir: Path, src, sets: dict[str, np.ndarray]) -> dict:
    from export.runtime import load_variant, read_manifest

    manifest = read_manifest(artifact_dir)
    out = {}
    for name in manifest["variants"]:
        runner = load_variant(artifact_dir, name, threads=1)
        logits, s_in = runner.infer(src.heldout.images)
        row = {"method": runner.detector.method, "accuracy": float((logits.argmax(1) == src.heldout.labels).mean()),
               "test_flagged": float(runner.detector.flags(s_in).mean())}
        for set_name, px in sets.items():
            s_out = runner.infer(px)[1]
            row[set_name] = {"auroc": ood.auroc(s_in, s_out), "fpr95": ood.fpr_at_tpr(s_in, s_out, 0.95),
                             "accepted_at_shipped": float((~runner.detector.flags(s_out)).mean())}
        out[name] = row
    return out


def serving_cost(artifact_dir: Path, pixels: np.ndarray, calls: int = 3000) -> dict:
    """ms per image through the inference core (PNG decode to the contract, then predict), with the
    detector and with it switched off (the logits alone, as a model exported without one answers),
    batch 1 and 8, 1 thread. The two alternate call by call (ABAB...) and each is the median of its
    calls, so that a shared machine's load drifts over both alike."""
    from export.runtime import load_variant, read_manifest

    manifest = read_manifest(artifact_dir)
    pngs = [encode_png(p) for p in pixels[:8]]
    out = {}
    for name in manifest["variants"]:
        runner = load_variant(artifact_dir, name, threads=1)
        with_score = InferenceCore(runner)
        without = InferenceCore(runner)
        without.detector = None  # logits only: runner(pixels), no score
        for batch in (1, 8):
            times: dict[str, list[float]] = {"with ood": [], "without": []}
            cores = (("with ood", with_score), ("without", without))
            n = max(200, calls // batch)
            for i in range(n + 20):
                for label, core in (cores if i % 2 else cores[::-1]):
                    t0 = time.perf_counter()
                    core.predict(np.stack([core.to_pixels(b) for b in pngs[:batch]]))
                    if i >= 20:  # the first calls warm up
                        times[label].append((time.perf_counter() - t0) / batch * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            out[f"{name} b{batch}"] = {"with_ood_ms": med["with ood"], "without_ms": med["without"],
                                       "overhead": med["with ood"] / med["without"] - 1.0, "calls": n}
    return out


def markdown(run: str, table: dict | None, variants: dict | None, cost: dict | None) -> str:
    lines: list[str] = []
    if table:
        lines += methods_markdown(run, table)
    if variants:
        sets = [k for k in next(iter(variants.values())) if isinstance(next(iter(variants.values()))[k], dict)]
        lines += ["", "The shipped detector through each exported variant (the serving path):", "",
                  "| variant | accuracy | test flagged | " + " | ".join(sets) + " |", "|---|---|---|" + "---|" * len(sets)]
        for name, row in variants.items():
            lines.append(f"| {name} | {row['accuracy']:.4f} | {row['test_flagged']:.1%} | " + " | ".join(
                f"{row[s]['auroc']:.4f} / {row[s]['fpr95']:.1%}" for s in sets) + " |")
    if cost:
        lines += ["", "Serving cost per image (PNG -> contract -> predict, 1 thread, calls alternating, medians):", "",
                  "| variant, batch | with ood (ms) | without (ms) | overhead |", "|---|---|---|---|"]
        for key, c in cost.items():
            lines.append(f"| {key} | {c['with_ood_ms']:.4f} | {c['without_ms']:.4f} | {c['overhead']:+.1%} |")
    return "\n".join(lines) + "\n"


def methods_markdown(run: str, table: dict) -> list[str]:
    ind = table["_in_distribution"]
    sets = [k for k in table[ood.METHODS[0]] if k != "test_flagged"]
    lines = [f"**{run}**: test accuracy {ind['accuracy']:.4f}, ECE {ind['ece']:.4f} (T = {ind['temperature']:.3f}); "
             f"fitted on {ind['fit_samples']} training images, threshold on {ind['val_samples']} validation images, "
             f"in-distribution = {ind['test_samples']} test images. AUROC / FPR@95TPR (lower is better) per set:", "",
             "| method | test flagged | " + " | ".join(sets) + " |", "|---|---|" + "---|" * len(sets)]
    for method in ood.METHODS:
        row = table[method]
        lines.append(f"| {method} | {row['test_flagged']:.1%} | " + " | ".join(
            f"{row[s]['auroc']:.4f} / {row[s]['fpr95']:.1%}" for s in sets) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/bench_ood.py", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the trained run (reads <runs-dir>/RUN/best.pt)")
    p.add_argument("--runs-dir", default="runs", help="where the training runs are")
    p.add_argument("--data-dir", default=None, help="the run's dataset (default: its checkpoint's)")
    p.add_argument("--artifacts", default=None, help="artifacts dir holding RUN/: also measure the exported "
                                                     "variants and the serving cost")
    p.add_argument("--fit-size", type=int, default=ExportConfig.ood_fit_size, help="training images to fit on")
    p.add_argument("--eval-size", type=int, default=0, help="test images (0: all)")
    p.add_argument("--knn-k", type=int, default=ood.DEFAULT_KNN_K, help="k of the knn method")
    p.add_argument("--cost-only", action="store_true", help="with --artifacts: only the serving cost")
    p.add_argument("--json", default=None, help="write the numbers here")
    a = p.parse_args(argv)
    cfg = ExportConfig(run=a.run, runs_dir=a.runs_dir, data_dir=a.data_dir, variants=("onnx-fp32",),
                       ood_fit_size=a.fit_size, eval_size=a.eval_size)
    try:
        src = load_source(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if src.validation is None:
        print(f"error: {cfg.checkpoint_path} was trained without a validation split; the threshold needs one",
              file=sys.stderr)
        return 2
    if a.cost_only and not a.artifacts:
        print("error: --cost-only measures an export: give --artifacts", file=sys.stderr)
        return 2
    sets = ood_sets(src.ckpt["dataset"], src.contract)
    table = variants = cost = None
    if not a.cost_only:
        table = compare_methods(src, sets, a.knn_k, ood.DEFAULT_ACCEPTANCE)
    if a.artifacts:
        artifact_dir = Path(a.artifacts) / a.run
        variants = None if a.cost_only else variants_table(artifact_dir, src, sets)
        cost = serving_cost(artifact_dir, src.heldout.images)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}\n")
    print(markdown(a.run, table, variants, cost))
    if a.json:
        atomic_write_json(a.json, {"run": a.run, "cpu": cpu_name(), "methods": table, "variants": variants,
                                   "serving_cost": cost, "sets": {k: len(v) for k, v in sets.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
