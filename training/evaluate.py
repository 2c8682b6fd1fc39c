"""``evaluate``: score a checkpoint on a dataset's test split; write the confusion matrix (JSON and PNG)
and a grid of the misclassified images, and log both to the run's TensorBoard when it has one."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import load_splits
from training.engine import classification_metrics, predict
from training.files import atomic_write_bytes, atomic_write_json


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 256,
    workers: int = 2,
) -> dict:
    """Evaluate ``checkpoint`` on the test split of ``dataset`` (default: the one it was trained on).

    Returns the metrics dict (accuracy, loss, per_class, confusion_matrix, files) and writes
    ``confusion_matrix.json``, ``confusion_matrix.png`` and ``misclassified.png`` to ``out_dir``
    (default: beside the checkpoint, in ``eval-<dataset>/``); the two pictures also go to the run's
    TensorBoard (``<checkpoint dir>/tb/``, when training wrote one) at the checkpoint's epoch.
    """
    ckpt = load_checkpoint(checkpoint)
    dataset = dataset or ckpt["dataset"]
    model, contract = model_from_checkpoint(ckpt)
    splits = load_splits(dataset, data_dir, val_fraction=0.0)
    if splits.contract != contract:
        raise ValueError(
            f"checkpoint {checkpoint} was trained for input {contract} but dataset "
            f"{dataset!r} gives {splits.contract}; evaluate on the dataset it was trained on "
            f"({ckpt.get('dataset')!r})"
        )
    loader = DataLoader(splits.test, batch_size=batch_size, num_workers=workers)
    logits, targets = predict(model, loader, torch.device("cpu"))
    metrics = {
        "checkpoint": str(checkpoint),
        "dataset": dataset,
        **classification_metrics(logits, targets, contract.class_names),
    }
    run = Path(checkpoint).parent.name
    out = Path(out_dir) if out_dir else Path(checkpoint).parent / f"eval-{dataset}"
    files = {
        "confusion_matrix_json": atomic_write_json(
            out / "confusion_matrix.json",
            {"class_names": list(contract.class_names), "rows_true_cols_pred": metrics["confusion_matrix"]},
        )
    }
    files["confusion_matrix"] = plot_confusion(
        metrics["confusion_matrix"],
        contract.class_names,
        out / "confusion_matrix.png",
        title=f"{run} on {dataset}: accuracy {metrics['accuracy']:.4f} ({metrics['samples']} images)",
    )
    probs = torch.softmax(logits, 1)
    wrong = torch.nonzero(probs.argmax(1) != targets).flatten()
    # the most confident mistakes first: those are the ones worth a look
    wrong = wrong[probs[wrong].max(1).values.argsort(descending=True)][:MAX_MISCLASSIFIED].tolist()
    files["misclassified"] = plot_misclassified(
        [splits.test[i][0] for i in wrong],
        [int(targets[i]) for i in wrong],
        [probs[i] for i in wrong],
        contract,
        out / "misclassified.png",
        title=f"{run} on {dataset}: {int((probs.argmax(1) != targets).sum())} of {metrics['samples']} test "
        f"images misclassified" + (f", the {len(wrong)} most confident shown" if wrong else ""),
    )
    log_figures(
        Path(checkpoint).parent / "tb",
        f"eval-{dataset}",
        ckpt.get("epoch", 0),
        {k: files[k] for k in ("confusion_matrix", "misclassified")},
    )
    return {**metrics, "files": {k: str(v) for k, v in files.items()}}


MAX_MISCLASSIFIED = 32  # a grid of 4 rows x 8: enough to see a pattern, small enough to read the labels


def plot_misclassified(
    images: list[torch.Tensor], labels: list[int], probs: list[torch.Tensor], contract, path: Path, title: str
) -> Path:
    """A labelled grid of (C, H, W) normalised test images: true label, predicted label and its
    (uncalibrated) probability over each; "none misclassified" when the list is empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(8, max(1, len(images)))
    rows = max(1, -(-len(images) // cols))
    # at least 7 inches wide: the title must fit also over one image (or none)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(7.0, 1.5 * cols + 0.4), 1.75 * rows + 0.6), dpi=100, squeeze=False
    )
    mean = torch.tensor(contract.mean).view(-1, 1, 1)
    std = torch.tensor(contract.std).view(-1, 1, 1)
    names = contract.class_names
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(images):
            continue
        px = (images[i] * std + mean).clamp(0, 1).numpy()  # (C, H, W) in 0..1, as the model saw it
        ax.imshow(
            px[0] if px.shape[0] == 1 else px.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1, interpolation="nearest"
        )
        pred = int(probs[i].argmax())
        ax.set_title(
            f"true {names[labels[i]]}\npred {names[pred]} {float(probs[i][pred]):.2f}", fontsize=7, color="#b00020"
        )
    if not images:
        axes[0, 0].text(0.5, 0.5, "none misclassified", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


def log_figures(tb_dir: Path, tag: str, step: int, pngs: dict[str, Path]) -> None:
    """Add PNG files to the TensorBoard log in ``tb_dir`` as images (nothing when there is no log:
    the run was trained with --no-tensorboard, or the checkpoint was moved)."""
    if not tb_dir.is_dir():
        return
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tb_dir)) as writer:
        for name, png in pngs.items():
            with Image.open(png) as img:
                writer.add_image(f"{tag}/{name}", np.asarray(img.convert("RGB")), step, dataformats="HWC")


def plot_confusion(matrix: list[list[int]], names, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 1.0 + 0.5 * k), dpi=100)
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(names)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=60, text_kw={"fontsize": 7}
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path
