"""Training configuration: parsed once from the command line into a frozen dataclass, saved with
each run as ``runs/<RUN>/config.json``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from training.data import AUGMENTATIONS, DATASETS
from training.models import MODELS

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
# tensor: the dataset as uint8 on the device, batches augmented there (training.tensordata);
# loader: DataLoader workers with PIL transforms, for data that does not fit; auto: tensor when it fits.
PIPELINES = ("auto", "tensor", "loader")


@dataclass(frozen=True)
class TrainConfig:
    run: str = "digits"
    model: str = "mnist_cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    runs_dir: str = "runs"
    epochs: int = 10
    batch_size: int = 128            # per process
    optimizer: str = "adamw"
    lr: float = 3e-3                 # peak learning rate (after warmup)
    momentum: float = 0.9            # SGD only
    nesterov: bool = False           # SGD only
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_steps: int | None = None  # linear warmup (onecycle: rising phase); None = 10 % of the steps
    min_steps: int = 500             # at least this many optimizer steps: small data gets more passes per epoch
    label_smoothing: float = 0.0
    accum_steps: int = 1             # optimizer step every N batches
    clip_grad_norm: float = 0.0      # 0 = off
    precision: str = "fp32"          # autocast dtype; fp16 needs CUDA (GradScaler)
    channels_last: bool | None = None  # None = on CUDA only, where it is faster
    augment: str | None = None       # None = the dataset's default policy
    val_fraction: float = 0.1
    image_size: int | None = None    # imagefolder / transfer learning only
    pretrained_weights: str | None = None
    freeze_backbone: bool = False
    seed: int = 0
    pipeline: str = "auto"
    workers: int = 2                 # DataLoader workers (loader pipeline only)
    device: str = "auto"
    resume: bool = False
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
            (self.warmup_steps is None or self.warmup_steps >= 0,
             f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.augment is None or self.augment in AUGMENTATIONS,
             f"unknown --augment {self.augment!r}; choose one of {AUGMENTATIONS}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.accum_steps >= 1, f"--accum-steps must be >= 1, got {self.accum_steps}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (self.run and "/" not in self.run, f"--run must be a plain name (it becomes the served "
                                               f"model name), got {self.run!r}"),
            (not MODELS[self.model].pretrained or self.pretrained_weights,
             f"--model {self.model} fine-tunes pretrained weights: pass --pretrained-weights FILE (a "
             f"torchvision state_dict saved with torch.save); nothing is downloaded from a hub"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One argparse option per TrainConfig field, with the dataclass defaults."""
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if field.name == "run":
            # torchrun's parser reads a bare --run as an abbreviation of its own --run-path:
            # under torchrun, spell it --run-name.
            parser.add_argument(flag, "--run-name", dest="run", default=default,
                                help="run name = served model name (under torchrun: --run-name)")
        elif field.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif field.name == "channels_last":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help="default: on when training on CUDA")
        else:
            kind = {"int": int, "float": float}.get(str(field.type).split(" |")[0], str)
            parser.add_argument(flag, type=kind, default=default)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
