"""The calibration reliability diagram of an exported run: ``python -m export.reliability --run RUN``.

Writes ``artifacts/<RUN>/reliability.png``: on the held-out test split, accuracy against confidence in
the ``ECE_BINS`` equal-width bins that ECE is measured in (``export.calibrate``), before (``T`` = 1, the
raw softmax) and after the temperature the manifest records, which is what the server applies. A
perfectly calibrated model sits on the diagonal; bars under it are over-confident. The number of images
per bin is printed in each bar, because a bin with three images says little.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from export.calibrate import ECE_BINS, ece, log_softmax
from export.runtime import read_manifest
from training.cli import ArgumentParser, HelpFormatter
from training.data import DataNotFoundError
from training.files import atomic_write_bytes


def bin_stats(
    logits: np.ndarray, labels: np.ndarray, temperature: float, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin (as ``export.calibrate.ece`` bins them): (images, accuracy, mean confidence);
    accuracy and confidence are NaN in an empty bin."""
    probs = np.exp(log_softmax(logits, temperature))
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        acc = np.bincount(which, weights=correct, minlength=bins) / count
        conf = np.bincount(which, weights=confidence, minlength=bins) / count
    return count, acc, conf


def plot_reliability(logits: np.ndarray, labels: np.ndarray, temperature: float, path: Path, title: str) -> Path:
    """Two panels, T = 1 and T = ``temperature``, each with its ECE; written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, ECE_BINS + 1)
    width = 1 / ECE_BINS
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), dpi=100, sharey=True)
    panels = (("raw softmax, T = 1", 1.0), (f"served, T = {temperature:.3f}", temperature))
    for ax, (name, t) in zip(axes, panels, strict=True):
        count, acc, conf = bin_stats(logits, labels, t)
        filled = count > 0
        ax.bar(
            edges[:-1][filled],
            acc[filled],
            width=width,
            align="edge",
            color="#8fb0d9",
            edgecolor="white",
            label="accuracy in bin (n: images)",
        )
        # the gap between what the model claims (mean confidence) and what it gets (accuracy): hatched,
        # so it reads the same above a bar (over-confident) and inside it (under-confident)
        ax.bar(
            edges[:-1][filled],
            np.abs(conf - acc)[filled],
            bottom=np.minimum(acc, conf)[filled],
            width=width,
            align="edge",
            fill=False,
            hatch="///",
            edgecolor="#c44e52",
            lw=0.8,
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for left, n in zip(edges[:-1][filled], count[filled], strict=True):
            ax.text(left + width / 2, 0.02, f"n={n}", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_title(f"{name}: ECE {ece(logits, labels, t):.4f}", fontsize=10)
        ax.set_xlabel("confidence (top probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


def reliability_diagram(run: str, artifacts_dir: str | Path = "artifacts", data_dir: str | None = None) -> Path:
    """Score the run's checkpoint (the eager model every variant is gated against) on its whole test
    split and draw the diagram with the manifest's temperature; returns the PNG's path."""
    from export.data import load_pixels
    from export.measure import eager_predict, predict_all
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    artifact = Path(artifacts_dir) / run
    manifest = read_manifest(artifact)
    calibration = manifest.get("calibration") or {}
    temperature = float(calibration.get("temperature", 1.0))
    model, contract = model_from_checkpoint(load_checkpoint(manifest["source"]["checkpoint"]))
    dataset = manifest["source"]["dataset"]
    data_dir = data_dir or manifest.get("provenance", {}).get("export_config", {}).get("data_dir")
    px = load_pixels(dataset, data_dir, contract, "test", image_size=contract.height)
    logits = predict_all(eager_predict(model, contract), px.images)
    fitted = calibration.get("fitted_on") or {}
    title = (
        f"{run} (version {manifest['version']}) on the {dataset} test split, {len(px)} images; "
        f"T fitted on {fitted.get('samples', 'no')} validation images"
    )
    return plot_reliability(logits, px.labels, temperature, artifact / "reliability.png", title)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m export.reliability", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    p.add_argument("--run", required=True, help="an exported run: artifacts-dir/RUN/manifest.json")
    p.add_argument("--artifacts-dir", default="artifacts", help="where the exported runs are")
    p.add_argument("--data-dir", default=None, help="the dataset's files (default: the manifest's)")
    a = p.parse_args(argv)
    try:
        print(reliability_diagram(a.run, a.artifacts_dir, a.data_dir))
    except (FileNotFoundError, ValueError, DataNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
