"""``evaluate``: score a checkpoint on a dataset's test split; write the confusion matrix as JSON and PNG."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.files import atomic_write_bytes, atomic_write_json
from training.data import load_splits
from training.engine import evaluate


def evaluate_checkpoint(checkpoint: str | Path, dataset: str | None = None, data_dir: str | None = None,
                        out_dir: str | Path | None = None, batch_size: int = 256,
                        workers: int = 2) -> dict:
    """Evaluate ``checkpoint`` on the test split of ``dataset`` (default: the one it was trained on).

    Returns the metrics dict (accuracy, loss, per_class, confusion_matrix) and writes
    ``confusion_matrix.json`` and ``confusion_matrix.png`` to ``out_dir`` (default: beside the
    checkpoint, in ``eval-<dataset>/``).
    """
    ckpt = load_checkpoint(checkpoint)
    dataset = dataset or ckpt["dataset"]
    model, contract = model_from_checkpoint(ckpt)
    splits = load_splits(dataset, data_dir, val_fraction=0.0)
    if splits.contract != contract:
        raise ValueError(f"checkpoint {checkpoint} was trained for input {contract} but dataset "
                         f"{dataset!r} gives {splits.contract}; evaluate on the dataset it was trained on "
                         f"({ckpt.get('dataset')!r})")
    loader = DataLoader(splits.test, batch_size=batch_size, num_workers=workers)
    metrics = evaluate(model, loader, torch.device("cpu"), contract.class_names)
    metrics = {"checkpoint": str(checkpoint), "dataset": dataset, **metrics}
    out = Path(out_dir) if out_dir else Path(checkpoint).parent / f"eval-{dataset}"
    atomic_write_json(out / "confusion_matrix.json", {"class_names": list(contract.class_names),
                                                      "rows_true_cols_pred": metrics["confusion_matrix"]})
    plot_confusion(metrics["confusion_matrix"], contract.class_names, out / "confusion_matrix.png",
                   title=f"{Path(checkpoint).parent.name} on {dataset}: accuracy {metrics['accuracy']:.4f}")
    return metrics


def plot_confusion(matrix: list[list[int]], names, path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 1.0 + 0.5 * k), dpi=100)
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(names)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=60, text_kw={"fontsize": 7})
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
