"""The CIFAR-10 recipe on a GPU in one call: the real trainer's images/s against its step ceiling.

    python bench/gpu_cifar_recipe.py --out DIR [--epochs 10]
    python bench/gpu_cifar_recipe.py --out DIR --device cpu --quick     # a smoke of this script

The recipe (``RECIPE``) carries the Fashion-MNIST sweep's lessons (bench/sweep_train.py,
docs/benchmarks.md) to CIFAR-10: a residual net (resnet9) over a plain one, a one-cycle schedule sized
to end with the run, label smoothing (0.2, as airbench), flip test-time augmentation inside the model
(``--flip-tta``: every export carries it), no weight averaging (it gained nothing once the one-cycle
schedule had annealed), channels-last, bf16 autocast where the device computes it natively
(``--precision auto``: bf16 on an Ampere-or-later GPU), and the dataset held on the device as uint8
with crop-flip augmentation done there per batch (``--pipeline tensor``). Crop-flip, not flip alone:
the sweep found flip better only within Fashion-MNIST's 5-epoch CPU budget, while the fast CIFAR-10
recipes this follows (airbench, DAWNBench's ResNet-9) crop at every epoch count they run.

No CIFAR-10 download is possible on the lent machines either: the data are 50,000 + 10,000 pattern
images written as real CIFAR-10 pickle batches (``training/datafiles.py``). Images/s and the ratio to
the step ceiling carry over to the real data (same shapes, same code path); the accuracy printed is the
patterns', not CIFAR-10's, which needs the real files (``make train RUN=r9 MODEL=resnet9 DATASET=cifar10
DATA_DIR=... ARGS="..."`` with the same arguments, docs/training.md).

Writes DIR/gpu_cifar_recipe.md (a section for docs/benchmarks.md) and DIR/gpu_cifar_recipe.json.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_train import config_ceiling, machine_line, run_training  # noqa: E402
from training.files import atomic_write_json, atomic_write_text  # noqa: E402

RECIPE = [
    "--model", "resnet9", "--dataset", "cifar10", "--batch-size", "512", "--precision", "auto",
    "--channels-last", "--pipeline", "tensor", "--augment", "crop-flip", "--label-smoothing", "0.2",
    "--flip-tta", "--val-fraction", "0",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-cifar-recipe"), help="data and runs go here")
    p.add_argument("--device", default="cuda")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--quick", action="store_true",
                   help="2,000 images, 2 epochs, width 8: a smoke of this script, not a measurement")
    a = p.parse_args(argv)

    import os

    import torch

    from training.datafiles import write_cifar10

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; run this on a GPU machine, or pass --device cpu --quick to smoke "
              "the script", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    load_before = os.getloadavg()[0]
    data = a.work / ("cifar-quick" if a.quick else "cifar")
    if not (data / "cifar-10-batches-py" / "test_batch").exists():
        write_cifar10(data, per_batch=400 if a.quick else 10_000, n_test=400 if a.quick else 10_000)
    epochs = 2 if a.quick else a.epochs
    quick = ["--width", "8", "--min-steps", "0"] if a.quick else []  # a narrow net, no step floor
    args = [*RECIPE, *quick, "--device", a.device, "--epochs", str(epochs)]
    ceiling = config_ceiling(args, channels=3, size=32, rounds=3 if a.quick else 10, steps=2 if a.quick else 20)
    res = run_training([*args, "--data-dir", str(data)], a.work / "runs", "cifar-recipe")
    later = res.history[1:] or res.history  # epoch 1 holds cuDNN autotuning and data staging on the device
    ips = statistics.median(h["images_per_s"] for h in later)
    command = "python -m training train " + shlex.join(args) + " --data-dir DATA"
    numbers = {
        "command": command,
        "step_ceiling_images_per_s": ceiling,
        "trainer_images_per_s": ips,
        "trainer_to_ceiling": ips / ceiling,
        "epoch_seconds": [h["seconds"] for h in res.history],
        "pattern_accuracy": [h["val_accuracy"] for h in res.history],
        "quick": a.quick,
    }
    md = "\n".join([
        f"## Training: the CIFAR-10 recipe on {a.device} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"`python bench/gpu_cifar_recipe.py{' --quick' if a.quick else ''}`)",
        "",
        f"{machine_line(load_before, a.device)}. `{command}` on CIFAR-10-shaped pattern data "
        f"({'2,000' if a.quick else '50,000'} training images).",
        "",
        "| epoch | seconds | training images/s | pattern accuracy |",
        "|---|---|---|---|",
        *[f"| {h['epoch']} | {h['seconds']:.1f} | {h['images_per_s']:,.0f} | {h['val_accuracy']:.4f} |"
          for h in res.history],
        "",
        f"Trainer {ips:,.0f} images/s (median of epochs {later[0]['epoch']}-{later[-1]['epoch']}) against a step "
        f"ceiling of {ceiling:,.0f} images/s: {ips / ceiling:.0%}. The accuracy is the synthetic patterns'; "
        "CIFAR-10 accuracy needs the real data.",
    ])
    atomic_write_text(a.out / "gpu_cifar_recipe.md", md + "\n")
    atomic_write_json(a.out / "gpu_cifar_recipe.json", numbers)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
