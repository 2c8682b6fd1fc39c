"""Training configuration: parsed once from the command line into a frozen dataclass, saved with
each run as ``runs/<RUN>/config.json``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from training.cli import from_args
from training.data import AUGMENTATIONS, DATASETS
from training.models import MODELS, takes

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "none")
# auto: bf16 on a GPU that supports it or a CPU with bf16 units (training.machine.native_bf16), else fp32.
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
# tensor: the dataset as uint8 on the device, batches augmented there (training.tensordata);
# loader: DataLoader workers with PIL transforms, for data that does not fit; auto: tensor when it fits.
PIPELINES = ("auto", "tensor", "loader")


@dataclass(frozen=True)
class TrainConfig:
    run: str = "digits"
    model: str = "mnist_cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    width: int | None = None  # channels of the model's first stage (None = the model's default)
    flip_tta: bool = False  # evaluate (and export) the mean of each image's and its mirror image's logits
    runs_dir: str = "runs"
    epochs: int = 10
    batch_size: int = 128  # per process
    optimizer: str = "adamw"
    lr: float = 3e-3  # peak learning rate (after warmup)
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_steps: int | None = None  # linear warmup (onecycle: rising phase); None = 10 % of the steps
    # At least this many optimizer steps: small data gets more passes per epoch. 1000, not 500: on 4,000
    # Fashion-MNIST images, 4 epochs landed 1.87 points under 30 epochs with 500 and 0.99 with 1000
    # (docs/benchmarks.md, "few epochs on small data").
    min_steps: int = 1000
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # exponential moving average of the weights per optimizer step; 0 = off
    accum_steps: int = 1  # optimizer step every N batches
    clip_grad_norm: float = 0.0  # 0 = off
    precision: str = "fp32"  # autocast dtype; fp16 needs CUDA (GradScaler)
    channels_last: bool | None = None  # None = on CUDA only, where it is faster
    augment: str | None = None  # None = the dataset's default policy
    val_fraction: float = 0.1
    image_size: int | None = None  # imagefolder / transfer learning only
    pretrained_weights: str | None = None
    freeze_backbone: bool = False
    seed: int = 0
    pipeline: str = "auto"
    workers: int = 2  # DataLoader workers (loader pipeline only)
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False  # replace a run trained on another dataset or model
    tensorboard: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.model in MODELS, f"unknown --model {self.model!r}; choose one of {sorted(MODELS)}"),
            (self.dataset in DATASETS, f"unknown --dataset {self.dataset!r}; choose one of {sorted(DATASETS)}"),
            (self.optimizer in OPTIMIZERS, f"unknown --optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, f"unknown --schedule {self.schedule!r}; choose one of {SCHEDULES}"),
            (self.precision in PRECISIONS, f"unknown --precision {self.precision!r}; choose one of {PRECISIONS}"),
            (self.pipeline in PIPELINES, f"unknown --pipeline {self.pipeline!r}; choose one of {PIPELINES}"),
            (self.min_steps >= 0, f"--min-steps must be >= 0, got {self.min_steps}"),
            (
                self.warmup_steps is None or self.warmup_steps >= 0,
                f"--warmup-steps must be >= 0, got {self.warmup_steps}",
            ),
            (
                self.augment is None or self.augment in AUGMENTATIONS,
                f"unknown --augment {self.augment!r}; choose one of {AUGMENTATIONS}",
            ),
            (
                self.width is None or self.width >= 1,
                f"--width must be >= 1, got {self.width}",
            ),
            (
                self.width is None or self.model not in MODELS or takes(self.model, "width"),
                (
                    f"--model {self.model} has a fixed width; leave --width out or pick one of "
                    f"{sorted(m for m in MODELS if takes(m, 'width'))}"
                ),
            ),
            (
                not self.flip_tta or self.model not in MODELS or takes(self.model, "flip_tta"),
                (
                    f"--model {self.model} has no flip test-time augmentation; leave --flip-tta out or pick one "
                    f"of {sorted(m for m in MODELS if takes(m, 'flip_tta'))}"
                ),
            ),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.accum_steps >= 1, f"--accum-steps must be >= 1, got {self.accum_steps}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1) (0: off), got {self.ema_decay}"),
            (0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (
                self.run and "/" not in self.run,
                (f"--run must be a plain name (it becomes the served model name), got {self.run!r}"),
            ),
            (
                self.model not in MODELS or not MODELS[self.model].pretrained or self.pretrained_weights,
                (
                    f"--model {self.model} fine-tunes pretrained weights: pass --pretrained-weights FILE (a "
                    f"torchvision state_dict saved with torch.save); nothing is downloaded from a hub"
                ),
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# --help, grouped as timm's train.py groups it: one help line per TrainConfig field, stated here only.
FLAG_GROUPS: dict[str, dict[str, str]] = {
    "run and data": {
        "run": "run name = served model name: writes runs-dir/RUN/ (under torchrun: --run-name)",
        "dataset": f"one of {', '.join(sorted(DATASETS))}",
        "data_dir": "pre-fetched dataset files (default: data/, downloaded when missing)",
        "runs_dir": "where runs/RUN/ goes",
        "val_fraction": "share of the training split held out for model selection",
        "image_size": "imagefolder / transfer learning only: square side the images are resized to",
        "pipeline": "tensor: dataset as uint8 on the device, batches augmented there; loader: DataLoader "
        "workers with PIL transforms (data that does not fit); auto: tensor when it fits",
        "workers": "DataLoader workers (loader pipeline only)",
        "augment": f"one of {', '.join(AUGMENTATIONS)} (default: the dataset's policy)",
    },
    "model": {
        "model": f"architecture, one of {', '.join(sorted(MODELS))}",
        "width": "channels of the first stage, later stages scale with it "
        f"({', '.join(sorted(m for m in MODELS if takes(m, 'width')))})",
        "flip_tta": "evaluate, save and export the model with flip test-time augmentation (the mean of each "
        "image's and its mirror image's logits: twice the inference compute); "
        f"{', '.join(sorted(m for m in MODELS if takes(m, 'flip_tta')))}",
        "pretrained_weights": "torchvision state_dict file for a fine-tuning model (nothing is downloaded)",
        "freeze_backbone": "train only the new head of a fine-tuning model",
    },
    "optimizer": {
        "optimizer": f"one of {', '.join(OPTIMIZERS)}",
        "lr": "peak learning rate (after warm-up)",
        "momentum": "SGD only",
        "nesterov": "SGD only",
        "weight_decay": "decoupled (AdamW) or L2 (Adam, SGD) weight decay",
        "batch_size": "images per optimizer step, per process",
        "accum_steps": "optimizer step every N batches",
        "clip_grad_norm": "clip the gradient norm to this (0: off)",
        "label_smoothing": "cross-entropy label smoothing",
        "ema_decay": "keep an exponential moving average of the weights (and BatchNorm statistics) with this "
        "decay per optimizer step; it is evaluated, saved and exported instead of the raw weights (0: off)",
    },
    "schedule (counted in optimizer steps)": {
        "epochs": "epochs; a small dataset makes several passes per epoch to reach --min-steps",
        "min_steps": "at least this many optimizer steps over the whole run (0: one pass per epoch)",
        "schedule": f"one of {', '.join(SCHEDULES)}",
        "warmup_steps": "linear warm-up steps (onecycle: its rising phase; default: 10 %% of the steps)",
    },
    "device and precision": {
        "device": "auto (cuda when present), cpu, cuda, cuda:N",
        "precision": f"autocast dtype, one of {', '.join(PRECISIONS)}; fp16 needs CUDA (GradScaler); auto: bf16 "
        "where the GPU or CPU computes it natively (avx512_bf16, amx_bf16), else fp32",
        "channels_last": "NHWC memory format (default: on when training on CUDA)",
    },
    "misc": {
        "seed": "seeds the data order, augmentation and initialisation (exact resume keeps it)",
        "resume": "continue runs/RUN/last.pt exactly where it stopped (same settings)",
        "overwrite": "replace runs/RUN/ even when it holds a model trained on another dataset or model",
        "tensorboard": "write TensorBoard logs to runs/RUN/tb/",
    },
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One argparse option per TrainConfig field, with the dataclass defaults, in FLAG_GROUPS' groups."""
    defaults = TrainConfig()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for title, helps in FLAG_GROUPS.items():
        group = parser.add_argument_group(title)
        for name, text in helps.items():
            field, flag = fields[name], "--" + name.replace("_", "-")
            default = getattr(defaults, name)
            if name == "run":
                # torchrun's parser reads a bare --run as an abbreviation of its own --run-path.
                group.add_argument(flag, "--run-name", dest="run", default=default, help=text)
            elif field.type == "bool" or name == "channels_last":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
            else:
                kind = {"int": int, "float": float}.get(str(field.type).split(" |")[0], str)
                group.add_argument(flag, type=kind, default=default, help=text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return from_args(TrainConfig, args)


def parse_train_args(argv: list[str]) -> TrainConfig:
    """The TrainConfig that ``python -m training train ARGV`` would run (benchmarks size their
    ceilings from it)."""
    parser = argparse.ArgumentParser(prog="python -m training train")
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))
