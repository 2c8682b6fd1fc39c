"""``fit(config)``: the training run behind ``python -m training train`` and ``make train``.

Single process or ``torchrun`` (DDP: gloo on CPU, nccl on CUDA; rank 0 logs and saves). Writes
``runs/<RUN>/{config.json,last.pt,best.pt,tb/}``; ``last.pt`` is rewritten after every epoch, so an
interrupted run continues with ``--resume`` and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from training.checkpoint import FORMAT_VERSION, load_checkpoint, provenance, save_checkpoint
from training.config import TrainConfig
from training.contract import Contract
from training.data import DATASETS, load_splits
from training.engine import evaluate, train_one_epoch
from training.files import atomic_write_text
from training.machine import native_bf16
from training.models import build_model


# ---- process / device ----------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists ~20 device types; the CLI says the few that matter
        raise ValueError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA but none is available; use --device cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 where ``device`` computes it natively, else fp32; other names unchanged."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if native_bf16() else "fp32"


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) for this process; sets up DDP when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


# ---- RNG state (saved per rank so resume continues every process's random stream) -----------------
def rng_state() -> dict:
    # legacy: ("MT19937", keys, pos, has_gauss, cached_gaussian), what set_state takes back
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": [list(s) if isinstance(s, tuple) else s for s in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- optimisation ------------------------------------------------------------------------------
def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Linear warm-up length in optimizer steps: ``--warmup-steps``, or 10 % of the run."""
    steps = round(0.1 * total_steps) if cfg.warmup_steps is None else cfg.warmup_steps
    return min(total_steps - 1, max(0, steps))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """A schedule stepped after every optimizer step, ``total_steps`` long, warm-up included."""
    warmup = warmup_steps(cfg, total_steps)
    if cfg.schedule == "onecycle":
        if total_steps < 4:  # OneCycleLR divides by each phase's length - 1: a tiny run keeps a constant lr
            return None
        # its rising phase must be 2 .. total_steps - 2 steps long for the same reason (1 raised
        # ZeroDivisionError on a 7-step run)
        rising = min(max(warmup, 2), total_steps - 2)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total_steps,
            pct_start=rising / total_steps,
            anneal_strategy="cos",
            cycle_momentum=cfg.optimizer == "sgd",
        )
    if cfg.schedule == "cosine":
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup))
        if warmup == 0:
            return cosine
        # LinearLR's first factor makes step 0 run at lr / warmup, reaching lr after `warmup` steps.
        ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
    return None


def passes_per_epoch(cfg: TrainConfig, steps_per_pass: int) -> int:
    """How many passes over the training data one epoch makes so that the run takes at least
    ``--min-steps`` optimizer steps (1 when the data alone gives enough)."""
    return max(1, math.ceil(cfg.min_steps / (cfg.epochs * max(1, steps_per_pass))))


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load a torchvision backbone state_dict from a local file into ``model.backbone``.

    The old classification head is dropped: the model has a new one sized for this dataset.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    backbone_keys = set(model.backbone.state_dict())
    kept = {k: v for k, v in state.items() if k in backbone_keys and v.shape == model.backbone.state_dict()[k].shape}
    missing = backbone_keys - set(kept)
    if len(kept) == 0 or len(missing) > 0.1 * len(backbone_keys):
        raise ValueError(
            f"{path} does not look like weights for this backbone: {len(missing)} of "
            f"{len(backbone_keys)} tensors missing (e.g. {sorted(missing)[:3]}); pass a "
            f"torchvision state_dict of the same architecture"
        )
    model.backbone.load_state_dict(kept, strict=False)


# ---- data: tensor-resident when it fits, DataLoader workers otherwise --------------------------------
class Batches(Protocol):
    """A DataLoader or the tensor pipeline's loader: iterable, and knows its number of batches."""

    def __iter__(self) -> Iterator: ...
    def __len__(self) -> int: ...


@dataclass
class Pipeline:
    """Where a run's batches come from. ``train``/``val``/``test`` yield (images, labels) batches
    (float, normalised); ``set_epoch`` reseeds the training order for an epoch."""

    kind: str  # "tensor" or "loader"
    contract: Contract
    train: Batches
    val: Batches
    test: Batches
    set_epoch: Callable[[int], None]
    samples: Callable[[], torch.Tensor]  # a few training images in 0..1, for TensorBoard
    passes: int  # passes over the training data per epoch


def _steps_per_pass(n: int, batch_size: int, accum_steps: int, drop_last: bool) -> int:
    batches = n // batch_size if drop_last else math.ceil(n / batch_size)
    return math.ceil(batches / accum_steps)


def build_pipeline(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Pipeline:
    """The run's batches: ``--pipeline tensor`` (or ``auto`` when the images fit on ``device``)
    keeps the dataset as uint8 there and augments whole batches with tensor ops; ``loader`` runs
    the PIL transforms in DataLoader workers."""
    from training.tensordata import TensorBatches, load_tensor_splits, memory_budget

    data = None
    if cfg.pipeline != "loader":
        budget = memory_budget(device) if cfg.pipeline == "auto" else None
        data = load_tensor_splits(
            cfg.dataset,
            cfg.data_dir,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            image_size=cfg.image_size,
            max_bytes=budget,
        )
        if data is None and rank == 0:
            print(
                f"{cfg.dataset} does not fit in a quarter of the free memory on {device}: "
                f"DataLoader with {cfg.workers} workers",
                flush=True,
            )
    if data is not None:
        drop_last = len(data.train) > cfg.batch_size * world
        passes = passes_per_epoch(
            cfg, _steps_per_pass(len(data.train) // world, cfg.batch_size, cfg.accum_steps, drop_last)
        )
        policy = cfg.augment or DATASETS[cfg.dataset].default_augment
        train = TensorBatches(
            data.train.to(device),
            data.contract,
            cfg.batch_size,
            augment=policy,
            shuffle=True,
            drop_last=drop_last,
            seed=cfg.seed,
            rank=rank,
            world=world,
            repeats=passes,
        )
        holdout = data.val if len(data.val) else data.test
        val = TensorBatches(holdout.to(device), data.contract, 256)
        test = TensorBatches(data.test.to(device), data.contract, 256)
        return Pipeline("tensor", data.contract, train, val, test, train.set_epoch, train.sample_grid, passes)

    splits = load_splits(
        cfg.dataset,
        cfg.data_dir,
        augment=cfg.augment,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        image_size=cfg.image_size,
    )
    drop_last = len(splits.train) > cfg.batch_size * world
    passes = passes_per_epoch(
        cfg, _steps_per_pass(len(splits.train) // world, cfg.batch_size, cfg.accum_steps, drop_last)
    )
    train_set = ConcatDataset([splits.train] * passes) if passes > 1 else splits.train
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    loader_kw = {"num_workers": cfg.workers, "pin_memory": device.type == "cuda", "persistent_workers": False}
    train = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=drop_last, **loader_kw
    )
    # Their own generator: evaluation must not draw from the global RNG that --resume restores.
    val = DataLoader(
        splits.val if len(splits.val) else splits.test, batch_size=256, generator=torch.Generator(), **loader_kw
    )
    test = DataLoader(splits.test, batch_size=256, generator=torch.Generator(), **loader_kw)

    def samples() -> torch.Tensor:
        images = torch.stack([splits.train[i][0] for i in range(min(32, len(splits.train)))])
        mean = torch.tensor(splits.contract.mean).view(1, -1, 1, 1)
        std = torch.tensor(splits.contract.std).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)

    return Pipeline(
        "loader",
        splits.contract,
        train,
        val,
        test,
        sampler.set_epoch if sampler is not None else (lambda epoch: None),
        samples,
        passes,
    )


# ---- the run -----------------------------------------------------------------------------------
def fit(cfg: TrainConfig) -> Path:
    """Train as ``cfg`` says; returns the path of ``best.pt``."""
    check_run_dir(cfg)
    device = resolve_device(cfg.device)
    # Defaults that depend on the machine or the dataset are settled here, once: the saved config (and
    # so --resume's check) and everything after see the precision and augmentation actually used.
    cfg = dataclasses.replace(
        cfg,
        precision=resolve_precision(cfg.precision, device),
        augment=cfg.augment or DATASETS[cfg.dataset].default_augment,
    )
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA (GradScaler); use --precision bf16 on CPU")
    rank, world, device = init_distributed(device)
    try:
        return _fit(cfg, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse, before any work, to replace a run trained on another dataset or model: the run name is
    the served name, so ``runs/digits`` trained on MNIST and then on scikit-learn's digits would
    silently change what ``/predictions/digits`` answers. ``--overwrite`` replaces it anyway."""
    saved_path = cfg.run_dir / "config.json"
    if cfg.overwrite or cfg.resume or not saved_path.is_file():
        return  # --resume: _check_resumable names every changed setting
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError:
        return  # a torn or foreign file: nothing to protect
    changed = [f"{k} {saved.get(k)}" for k in ("dataset", "model") if saved.get(k) != getattr(cfg, k)]
    if changed:
        raise ValueError(
            f"{cfg.run_dir} holds a model trained with {' and '.join(changed)}, not "
            f"{cfg.dataset}/{cfg.model}; choose another --run name (make train RUN=...), "
            f"move the old run away (mv {cfg.run_dir} {Path(cfg.runs_dir) / str(saved.get('dataset'))}), "
            f"or pass --overwrite to replace it"
        )


def _fit(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Path:
    is_main = rank == 0
    last_path, best_path = cfg.run_dir / "last.pt", cfg.run_dir / "best.pt"
    resume = _load_resume(cfg, last_path, is_main)
    seed_everything(cfg.seed + rank)

    pipe = build_pipeline(cfg, rank, world, device)
    model, arch_args, channels_last = _build_model(cfg, pipe.contract, device, pretrained=resume is None)
    steps_per_epoch = math.ceil(len(pipe.train) / cfg.accum_steps)
    if is_main:
        print(
            f"{pipe.kind} pipeline: {steps_per_epoch} optimizer steps per epoch"
            + (f" ({pipe.passes} passes over the data, --min-steps {cfg.min_steps})" if pipe.passes > 1 else ""),
            flush=True,
        )
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, cfg.epochs * steps_per_epoch)
    ema = build_ema(cfg, model)
    # What is evaluated, saved as state_dict and exported: the average when there is one.
    shipped = ema.module if ema is not None else model
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    train_model = (
        nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    history: list[dict] = []
    start_epoch, best_acc = 0, -1.0
    if resume is not None:
        start_epoch, best_acc, history = _restore(resume, rank, model, optimizer, scheduler, scaler, ema)
        if is_main:
            print(f"resumed {last_path} at epoch {start_epoch}/{cfg.epochs}")
    writer = _start_run_dir(cfg, pipe, fresh=start_epoch == 0) if is_main else None

    base = {
        "format": FORMAT_VERSION,
        "arch": cfg.model,
        "arch_args": arch_args,
        "contract": pipe.contract.to_dict(),
        "dataset": cfg.dataset,
        "config": _plain(cfg),
    }
    for epoch in range(start_epoch, cfg.epochs):
        pipe.set_epoch(epoch)
        t0 = time.perf_counter()
        stats = train_one_epoch(
            train_model,
            pipe.train,
            optimizer,
            scheduler,
            scaler,
            device,
            precision=cfg.precision,
            label_smoothing=cfg.label_smoothing,
            accum_steps=cfg.accum_steps,
            clip_grad_norm=cfg.clip_grad_norm,
            channels_last=channels_last,
            progress=f"epoch {epoch + 1}/{cfg.epochs}" if is_main else None,
            on_step=_callbacks(
                _step_logger(writer, optimizer, epoch * steps_per_epoch),
                (lambda _loss: ema.update_parameters(model)) if ema is not None else None,
            ),
        )
        rngs = _gather_rng(world)
        if is_main:
            val = evaluate(
                shipped,
                pipe.val,
                device,
                pipe.contract.class_names,
                precision=cfg.precision,
                channels_last=channels_last,
            )
            record = _epoch_record(cfg, epoch, stats, val, world, optimizer, time.perf_counter() - t0)
            history.append(record)
            _log_epoch(record, writer, cfg.epochs)
            state = {
                **base,
                "state_dict": _cpu_state(shipped),
                "epoch": epoch + 1,
                "metrics": {"val_accuracy": val["accuracy"], "val_loss": val["loss"]},
                "provenance": provenance(),
            }
            if val["accuracy"] > best_acc:
                best_acc = val["accuracy"]
                save_checkpoint(state, best_path)
            save_checkpoint(
                {
                    **state,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "scaler": scaler.state_dict(),
                    "rng": rngs,
                    "best_val_accuracy": best_acc,
                    "history": history,
                    # The raw weights the optimizer goes on from, and how many steps the average holds.
                    **(
                        {"train_state_dict": _cpu_state(model), "ema_steps": int(ema.n_averaged)}
                        if ema is not None
                        else {}
                    ),
                },
                last_path,
            )
        if world > 1:
            dist.barrier()  # rank 0 evaluates and saves while the others wait

    if is_main:
        _finish(cfg, best_path, pipe, device, writer, history)
    return best_path


def _load_resume(cfg: TrainConfig, last_path: Path, is_main: bool) -> dict | None:
    """``last.pt`` when ``--resume`` finds one whose config this run may continue, else None."""
    resume = load_checkpoint(last_path) if cfg.resume and last_path.exists() else None
    if cfg.resume and resume is None and is_main:
        print(f"--resume: no {last_path} yet, starting a new run")
    if resume is not None:
        _check_resumable(resume["config"], cfg)
    return resume


def _build_model(
    cfg: TrainConfig, contract: Contract, device: torch.device, pretrained: bool
) -> tuple[nn.Module, dict, bool]:
    """The architecture sized for ``contract``, on ``device``; returns (model, arch_args, channels_last)."""
    arch_args = {"in_channels": contract.channels, "num_classes": contract.num_classes, "image_size": contract.height}
    if cfg.freeze_backbone:
        arch_args["freeze_backbone"] = True
    if cfg.width is not None:
        arch_args["width"] = cfg.width
    if cfg.flip_tta:
        arch_args["flip_tta"] = True
    model = build_model(cfg.model, **arch_args)
    if cfg.pretrained_weights and pretrained:
        load_pretrained(model, cfg.pretrained_weights)
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return model, arch_args, channels_last


def _restore(resume: dict, rank: int, model, optimizer, scheduler, scaler, ema) -> tuple[int, float, list]:
    """Load ``last.pt``'s states; returns (epochs done, best validation accuracy, history)."""
    if ema is not None:
        model.load_state_dict(resume["train_state_dict"])
        ema.module.load_state_dict(resume["state_dict"])
        ema.n_averaged.fill_(resume["ema_steps"])
    else:
        model.load_state_dict(resume["state_dict"])
    optimizer.load_state_dict(resume["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(resume["scheduler"])
    scaler.load_state_dict(resume["scaler"])
    set_rng_state(resume["rng"][rank])
    return resume["epoch"], resume["best_val_accuracy"], resume["history"]


def _start_run_dir(cfg: TrainConfig, pipe: Pipeline, fresh: bool):
    """Write ``config.json``; returns the TensorBoard writer (None with ``--no-tensorboard``)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.run_dir / "config.json", cfg.to_json())
    if not cfg.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(cfg.run_dir / "tb"))
    if fresh:
        from torchvision.utils import make_grid

        writer.add_image("train/samples", make_grid(pipe.samples(), nrow=8), 0)
    return writer


# Per-step TensorBoard scalars every this many optimizer steps: reading the loss waits for the device,
# and 10 gives make demo's 150-step run 15 points and a 5-epoch MNIST run ~200.
STEP_LOG_EVERY = 10


def build_ema(cfg: TrainConfig, model: nn.Module) -> AveragedModel | None:
    """The moving average of ``model``'s weights and buffers (BatchNorm statistics too, so the average
    needs no extra pass to recompute them), or None with ``--ema-decay 0``."""
    if cfg.ema_decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)


def _callbacks(*callbacks):
    """One ``on_step`` calling each of ``callbacks`` that is not None (None when none is)."""
    live = [c for c in callbacks if c is not None]
    if not live:
        return None

    def call(loss) -> None:
        for c in live:
            c(loss)

    return call


def _step_logger(writer, optimizer, first_step: int):
    """``on_step`` for train_one_epoch: the batch loss and the learning rate under ``step/`` at the
    global optimizer step (None without a writer: other ranks, --no-tensorboard)."""
    if writer is None:
        return None
    step = first_step

    def log(loss) -> None:
        nonlocal step
        step += 1
        if step % STEP_LOG_EVERY == 0:
            writer.add_scalar("step/loss", float(loss), step)
            writer.add_scalar("step/lr", optimizer.param_groups[0]["lr"], step)

    return log


def _epoch_record(cfg: TrainConfig, epoch: int, stats, val: dict, world: int, optimizer, seconds: float) -> dict:
    return {
        "epoch": epoch + 1,
        "train_loss": stats.loss,
        "train_accuracy": stats.accuracy,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "images_per_s": stats.images_per_s * world,
        "seconds": seconds,
        "lr": optimizer.param_groups[0]["lr"],
    }


def _log_epoch(record: dict, writer, epochs: int) -> None:
    print(
        f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} acc "
        f"{record['train_accuracy']:.4f}  val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}  "
        f"{record['images_per_s']:.0f} img/s  {record['seconds']:.1f}s",
        flush=True,
    )
    if writer is not None:
        for key, value in record.items():
            if key != "epoch":
                writer.add_scalar(key.replace("_", "/", 1), value, record["epoch"])


def _finish(cfg: TrainConfig, best_path: Path, pipe: Pipeline, device, writer, history) -> None:
    """Score best.pt on the untouched test split and store the result in it."""
    from training.checkpoint import model_from_checkpoint

    best = load_checkpoint(best_path)
    model, contract = model_from_checkpoint(best)
    model.to(device)
    test = evaluate(model, pipe.test, device, contract.class_names)
    best["metrics"] = {
        **best["metrics"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_samples": test["samples"],
        "train_seconds": round(sum(h["seconds"] for h in history), 2),
    }
    save_checkpoint(best, best_path)
    print(
        f"best epoch {best['epoch']}: val acc {best['metrics']['val_accuracy']:.4f}, "
        f"test acc {test['accuracy']:.4f} on {test['samples']} held-out images"
    )
    if writer is not None:
        writer.add_hparams(
            {k: v for k, v in _plain(cfg).items() if isinstance(v, (int, float, str, bool))},
            {"hparam/test_accuracy": test["accuracy"], "hparam/val_accuracy": best["metrics"]["val_accuracy"]},
            run_name=".",
        )
        writer.close()


def _gather_rng(world: int) -> list[dict]:
    state = rng_state()
    if world == 1:
        return [state]
    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _plain(cfg: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """Resuming with a different model, data or optimisation would silently change the run."""
    fixed: tuple[str, ...] = (
        "model",
        "ema_decay",
        "width",
        "flip_tta",
        "dataset",
        "batch_size",
        "optimizer",
        "schedule",
        "seed",
        "accum_steps",
        "lr",
    )
    if "pipeline" in saved:  # runs from before the tensor pipeline did not record these
        fixed += ("pipeline", "min_steps", "warmup_steps", "augment")
    # A setting added later is absent from older runs' config, which trained with its default.
    was = {k: saved.get(k, getattr(TrainConfig, k)) for k in fixed}
    changed = [f"{k}: {was[k]!r} -> {getattr(cfg, k)!r}" for k in fixed if was[k] != getattr(cfg, k)]
    if saved.get("epochs") != cfg.epochs and cfg.schedule != "none":
        changed.append(f"epochs: {saved.get('epochs')} -> {cfg.epochs} (the LR schedule spans all epochs)")
    if changed:
        raise ValueError(
            f"cannot --resume {cfg.run_dir / 'last.pt'} with changed settings ({'; '.join(changed)}); "
            f"use the original settings or a new --run name"
        )
