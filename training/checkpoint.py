"""Checkpoints: written atomically, loaded with ``weights_only=True``, able to rebuild their model.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts only, so the safe loader reads
it). ``best.pt`` holds what it takes to use the model; ``last.pt`` adds optimizer, scheduler, scaler
and RNG state so that ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from training.contract import Contract
from training.files import atomic_write_bytes
from training.models import build_model

FORMAT_VERSION = 1


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    return atomic_write_bytes(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train first (make train RUN=...)")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a format-{FORMAT_VERSION} checkpoint of this project "
            f"(keys: {sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__})"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict) -> tuple[nn.Module, Contract]:
    """Rebuild the trained model (in eval mode) and its contract from a loaded checkpoint."""
    model = build_model(ckpt["arch"], **ckpt["arch_args"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), Contract.from_dict(ckpt["contract"])


def provenance() -> dict:
    """Who made an artifact: code version and library versions."""
    import torchvision

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            != ""
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {
        "git_commit": commit or "unknown",
        "git_dirty": dirty,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
