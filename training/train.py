"""``fit(config)``: the training run behind ``python -m training train`` and ``make train``.

Single process or ``torchrun`` (DDP: gloo on CPU, nccl on CUDA; rank 0 logs and saves). Writes
``runs/<RUN>/{config.json,last.pt,best.pt,tb/}``; ``last.pt`` is rewritten after every epoch, so an
interrupted run continues with ``--resume`` and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from training.checkpoint import (FORMAT_VERSION, atomic_write_bytes, load_checkpoint, provenance,
                                 save_checkpoint)
from training.config import TrainConfig
from training.data import load_splits
from training.engine import evaluate, train_one_epoch
from training.models import build_model


# ---- process / device ----------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA but none is available; use --device cpu")
    return device


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
    np_state = np.random.get_state()
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
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-optimizer-step schedule with a linear warmup of ``warmup_epochs``."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(total - 1, max(0, round(cfg.warmup_epochs * steps_per_epoch)))
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total, pct_start=max(warmup / total, 1e-3),
            anneal_strategy="cos", cycle_momentum=cfg.optimizer == "sgd")
    if cfg.schedule == "cosine":
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load a torchvision backbone state_dict from a local file into ``model.backbone``.

    The old classification head is dropped: the model has a new one sized for this dataset.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    backbone_keys = set(model.backbone.state_dict())
    kept = {k: v for k, v in state.items() if k in backbone_keys
            and v.shape == model.backbone.state_dict()[k].shape}
    missing = backbone_keys - set(kept)
    if len(kept) == 0 or len(missing) > 0.1 * len(backbone_keys):
        raise ValueError(f"{path} does not look like weights for this backbone: {len(missing)} of "
                         f"{len(backbone_keys)} tensors missing (e.g. {sorted(missing)[:3]}); pass a "
                         f"torchvision state_dict of the same architecture")
    model.backbone.load_state_dict(kept, strict=False)


# ---- the run -----------------------------------------------------------------------------------
def fit(cfg: TrainConfig) -> Path:
    """Train as ``cfg`` says; returns the path of ``best.pt``."""
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA (GradScaler); use --precision bf16 on CPU")
    rank, world, device = init_distributed(device)
    try:
        return _fit(cfg, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _fit(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Path:
    is_main = rank == 0
    run_dir = cfg.run_dir
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    resume = load_checkpoint(last_path) if cfg.resume and last_path.exists() else None
    if cfg.resume and resume is None and is_main:
        print(f"--resume: no {last_path} yet, starting a new run")
    if resume is not None:
        _check_resumable(resume["config"], cfg)
    seed_everything(cfg.seed + rank)

    splits = load_splits(cfg.dataset, cfg.data_dir, augment=cfg.augment,
                         val_fraction=cfg.val_fraction, seed=cfg.seed, image_size=cfg.image_size)
    contract = splits.contract
    arch_args = {"in_channels": contract.channels, "num_classes": contract.num_classes,
                 "image_size": contract.height}
    if cfg.freeze_backbone:
        arch_args["freeze_backbone"] = True
    model = build_model(cfg.model, **arch_args)
    if cfg.pretrained_weights and resume is None:
        load_pretrained(model, cfg.pretrained_weights)
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)

    sampler = DistributedSampler(splits.train, world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda",
                     persistent_workers=False)
    train_loader = DataLoader(splits.train, batch_size=cfg.batch_size, shuffle=sampler is None,
                              sampler=sampler, drop_last=len(splits.train) > cfg.batch_size * world,
                              **loader_kw)
    # Its own generator: evaluation must not draw from the global RNG that --resume restores.
    val_loader = DataLoader(splits.val if len(splits.val) else splits.test, batch_size=256,
                            generator=torch.Generator(), **loader_kw)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accum_steps)

    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    train_model = (nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
                   if world > 1 else model)

    start_epoch, best_acc, history = 0, -1.0, []
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"][rank])
        start_epoch, best_acc, history = resume["epoch"], resume["best_val_accuracy"], resume["history"]
        if is_main:
            print(f"resumed {last_path} at epoch {start_epoch}/{cfg.epochs}")

    writer = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.json", lambda f: f.write(cfg.to_json().encode()))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(run_dir / "tb"))
            if start_epoch == 0:
                _log_sample_grid(writer, splits.train, contract)

    base = {"format": FORMAT_VERSION, "arch": cfg.model, "arch_args": arch_args,
            "contract": contract.to_dict(), "dataset": cfg.dataset, "config": _plain(cfg)}
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        stats = train_one_epoch(
            train_model, train_loader, optimizer, scheduler, scaler, device, precision=cfg.precision,
            label_smoothing=cfg.label_smoothing, accum_steps=cfg.accum_steps,
            clip_grad_norm=cfg.clip_grad_norm, channels_last=channels_last,
            progress=f"epoch {epoch + 1}/{cfg.epochs}" if is_main else None)
        rngs = _gather_rng(world)
        if not is_main:
            if world > 1:
                dist.barrier()  # rank 0 evaluates and saves
            continue
        val = evaluate(model, val_loader, device, contract.class_names, precision=cfg.precision,
                       channels_last=channels_last)
        seconds = time.perf_counter() - t0
        images_per_s = stats.images_per_s * world
        record = {"epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                  "images_per_s": images_per_s, "seconds": seconds,
                  "lr": optimizer.param_groups[0]["lr"]}
        history.append(record)
        print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {stats.loss:.4f} acc {stats.accuracy:.4f}  "
              f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f}  {images_per_s:.0f} img/s  "
              f"{seconds:.1f}s", flush=True)
        if writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(key.replace("_", "/", 1), value, epoch + 1)
        state = {**base, "state_dict": _cpu_state(model), "epoch": epoch + 1,
                 "metrics": {"val_accuracy": val["accuracy"], "val_loss": val["loss"]},
                 "provenance": provenance()}
        if val["accuracy"] > best_acc:
            best_acc = val["accuracy"]
            save_checkpoint(state, best_path)
        save_checkpoint({**state, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else {},
                         "scaler": scaler.state_dict(), "rng": rngs, "best_val_accuracy": best_acc,
                         "history": history}, last_path)
        if world > 1:
            dist.barrier()

    if is_main:
        _finish(cfg, best_path, splits, device, writer, history)
    return best_path


def _finish(cfg: TrainConfig, best_path: Path, splits, device, writer, history) -> None:
    """Score best.pt on the untouched test split and store the result in it."""
    from training.checkpoint import model_from_checkpoint

    best = load_checkpoint(best_path)
    model, contract = model_from_checkpoint(best)
    model.to(device)
    test = evaluate(model, DataLoader(splits.test, batch_size=256, num_workers=cfg.workers,
                                      generator=torch.Generator()), device,
                    contract.class_names)
    best["metrics"] = {**best["metrics"], "test_accuracy": test["accuracy"], "test_loss": test["loss"],
                       "test_samples": test["samples"],
                       "train_seconds": round(sum(h["seconds"] for h in history), 2)}
    save_checkpoint(best, best_path)
    print(f"best epoch {best['epoch']}: val acc {best['metrics']['val_accuracy']:.4f}, "
          f"test acc {test['accuracy']:.4f} on {test['samples']} held-out images")
    if writer is not None:
        writer.add_hparams({k: v for k, v in _plain(cfg).items() if isinstance(v, (int, float, str, bool))},
                           {"hparam/test_accuracy": test["accuracy"],
                            "hparam/val_accuracy": best["metrics"]["val_accuracy"]}, run_name=".")
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
    import dataclasses
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """Resuming with a different model, data or optimisation would silently change the run."""
    fixed = ("model", "dataset", "batch_size", "optimizer", "schedule", "seed", "accum_steps", "lr")
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in fixed if saved.get(k) != getattr(cfg, k)]
    if saved.get("epochs") != cfg.epochs and cfg.schedule != "none":
        changed.append(f"epochs: {saved.get('epochs')} -> {cfg.epochs} (the LR schedule spans all epochs)")
    if changed:
        raise ValueError(f"cannot --resume {cfg.run_dir / 'last.pt'} with changed settings ({'; '.join(changed)}); "
                         f"use the original settings or a new --run name")


def _log_sample_grid(writer, dataset, contract) -> None:
    from torchvision.utils import make_grid
    images = torch.stack([dataset[i][0] for i in range(min(32, len(dataset)))])
    mean = torch.tensor(contract.mean).view(1, -1, 1, 1)
    std = torch.tensor(contract.std).view(1, -1, 1, 1)
    writer.add_image("train/samples", make_grid((images * std + mean).clamp(0, 1), nrow=8), 0)
