"""The two loops every stage reuses: ``train_one_epoch`` and ``evaluate``."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The one mixed-precision context for training and evaluation (off for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images_per_s: float
    images: int


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
    accum_steps: int = 1,
    clip_grad_norm: float = 0.0,
    channels_last: bool = False,
    progress: str | None = None,
    on_step=None,
) -> EpochStats:
    """One pass over ``loader`` (a DataLoader, or ``training.tensordata.TensorBatches`` whose batches
    are on ``device`` already); steps ``scheduler`` after every optimizer step, then calls
    ``on_step(loss)`` with the last batch's loss (a detached tensor: reading it waits for the device,
    so the callback decides how often)."""
    model.train()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=progress, leave=False, dynamic_ncols=True, disable=progress is None)
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader)
    for step, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
            loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        # Average over the accumulation window so the step size does not depend on accum_steps.
        scaler.scale(loss / accum_steps).backward()
        if (step + 1) % accum_steps == 0 or step + 1 == n_batches:
            if clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            if on_step is not None:
                on_step(loss.detach())
        n = targets.numel()
        seen += n
        total_loss += loss.detach().float() * n
        correct += (logits.detach().argmax(1) == targets).sum()
        if progress is not None and step % 10 == 0:
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{total_loss.item() / seen:.4f}",
                acc=f"{correct.item() / seen:.3f}",
                img_s=f"{seen / elapsed:.0f}",
            )
    loss_sum, n_correct = total_loss.item(), correct.item()  # waits for the device: then time it
    elapsed = time.perf_counter() - start
    return EpochStats(loss_sum / max(seen, 1), n_correct / max(seen, 1), seen / max(elapsed, 1e-9), seen)


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, *, precision: str = "fp32", channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on CPU) and targets for every sample in ``loader``."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    all_logits, all_targets = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with autocast(device, precision):
            all_logits.append(model(images).float().cpu())
        all_targets.append(targets.cpu())
    return torch.cat(all_logits), torch.cat(all_targets)


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, class_names: tuple[str, ...] | list[str]
) -> dict:
    """Accuracy, mean loss, per-class precision/recall/F1/support and the confusion matrix (rows: true)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(class_names)))  # every class, also one the split happens not to contain
    y_true, y_pred = targets.numpy(), logits.argmax(1).numpy()
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {
        name: {
            "precision": round(float(precision[i]), 6),
            "recall": round(float(recall[i]), 6),
            "f1": round(float(f1[i]), 6),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    n = int(targets.numel())
    return {
        "accuracy": float((y_true == y_pred).sum() / max(n, 1)),
        "loss": float(F.cross_entropy(logits, targets)) if n else float("nan"),
        "samples": n,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, class_names: tuple[str, ...] | list[str], **kwargs
) -> dict:
    logits, targets = predict(model, loader, device, **kwargs)
    return classification_metrics(logits, targets, class_names)
