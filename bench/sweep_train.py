"""Time-to-accuracy sweep for 28x28 recipes on real Fashion-MNIST, through the real CLI.

    python bench/sweep_train.py                          # every configuration, seed 0
    python bench/sweep_train.py --only resnet8-w16 --seeds 0,1,2
    python bench/sweep_train.py --docs docs/benchmarks.md --json reports/sweep_train.json
    make bench-sweep

Every configuration is one ``python -m training train`` command (``CONFIGS``: model, width, epochs,
batch size, optimizer and schedule, label smoothing, augmentation), sized so that its whole schedule
fits a 180 s budget on a 2-core AVX2 machine: a one-cycle schedule only reaches its accuracy when it
has annealed, so a recipe is judged by where its own schedule ends, not by a point on a longer one.
With ``--val-fraction 0`` the trainer evaluates the official 10,000-image test split after every
epoch, so ``last.pt``'s history is the time-to-accuracy curve (seconds: training plus per-epoch
evaluation). Nothing is selected on the test split: every number is an epoch's.

Beside each run, in the same process and just before it: the run's step ceiling (images/s of the
same optimizer step on one fixed random batch, same model, width, batch size and memory format), so
that the seconds carry to another CPU as the trainer-to-ceiling ratio; and after it, the final
weights' test accuracy with flip test-time augmentation (the mean of the logits of each image and its
mirror image), which costs a second forward pass per request when served.

A finished run is read back from ``--runs-dir`` (its ``sweep.json``) unless ``--fresh``: a sweep that
was interrupted continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_train import (  # noqa: E402
    FASHION_BUDGET_S,
    FASHION_DIR,
    TIME_TO_TARGETS,
    config_ceiling,
    curve,
    ensure_fashion,
    machine_line,
    plot_curves,
    run_training,
    time_to,
)
from loadtest.docs import update_section  # noqa: E402
from training.files import atomic_write_json  # noqa: E402
from training.machine import cpu_name  # noqa: E402

# name -> the training arguments besides the dataset (each sized to end inside the budget here, with
# --min-steps 0 where 2 epochs of 469 steps would otherwise be stretched to the default floor of 1000:
# bn_cnn at width 32 trains ~900 images/s on 2 AVX2 cores, width 16 ~3,100; resnet8 width 16 ~2,200).
CL = ["--channels-last"]  # 1.2-1.3x the images/s of NCHW on AVX2 (fp32; docs/benchmarks.md, step ceiling)
R8 = ["--model", "resnet8", "--width", "16", "--epochs", "5", "--augment", "flip", *CL]
CONFIGS: dict[str, list[str]] = {
    "bn_cnn-w32-e2": ["--model", "bn_cnn", "--epochs", "2", "--min-steps", "0", *CL],
    "bn_cnn-w16-e8": ["--model", "bn_cnn", "--width", "16", "--epochs", "8", "--augment", "crop-flip", *CL],
    "bn_cnn-w16-e8-flip": ["--model", "bn_cnn", "--width", "16", "--epochs", "8", "--augment", "flip", *CL],
    "resnet8-w16-e5": ["--model", "resnet8", "--width", "16", "--epochs", "5", "--augment", "crop-flip", *CL],
    "resnet8-w16-e5-flip": ["--model", "resnet8", "--width", "16", "--epochs", "5", "--augment", "flip", *CL],
    "bn_cnn-w24-e3-flip": ["--model", "bn_cnn", "--width", "24", "--epochs", "3", "--augment", "flip", *CL],
    "resnet8-w24-e2-flip": ["--model", "resnet8", "--width", "24", "--epochs", "2", "--min-steps", "0", "--augment", "flip", *CL],
    # round 2: levers on the best of round 1 (resnet8, width 16, 5 epochs, flip)
    "r8-ls": [*R8, "--label-smoothing", "0.1"],
    "r8-ema": [*R8, "--ema-decay", "0.99"],
    "r8-lr6e-3": [*R8, "--lr", "6e-3"],
    "r8-sgd": [*R8, "--optimizer", "sgd", "--nesterov", "--lr", "0.1"],
    "r8-w20-e4": ["--model", "resnet8", "--width", "20", "--epochs", "4", "--augment", "flip", *CL],
    # round 3: the levers that helped, together; flip TTA inside the model, so the per-epoch evaluation
    # (and its seconds) include it. The Makefile's recipe for RUN=fashion.
    "r8-ls-tta": [*R8, "--label-smoothing", "0.1", "--flip-tta"],
}
# beyond the budget: what the same recipe reaches with 8 epochs, i.e. on a CPU with a 1.6x ceiling
CONFIGS["r8-ls-tta-e8"] = [*CONFIGS["r8-ls-tta"], "--epochs", "8"]
RECIPE, RECIPE_SEEDS = "r8-ls-tta", (0, 1, 2)  # the chosen recipe always runs with three seeds



@dataclass(frozen=True)
class SweepRun:
    config: str
    seed: int
    command: str
    curve: list[tuple[int, float, float, float]]  # (epoch, cumulative s, test accuracy, images/s)
    ceiling_images_per_s: float
    plain_accuracy: float  # the final weights' test accuracy without test-time augmentation
    tta_accuracy: float  # the same weights with flip test-time augmentation
    wall_s: float

    @property
    def trainer_images_per_s(self) -> float:
        return statistics.median(r[3] for r in self.curve)

    def best_within(self, budget: float = FASHION_BUDGET_S) -> float | None:
        return max((acc for _, s, acc, _ in self.curve if s <= budget), default=None)


def final_accuracies(checkpoint: Path, data_dir: Path) -> tuple[float, float]:
    """Test accuracy of the checkpoint's weights without and with flip test-time augmentation: the
    logits of the image, and their mean with the mirror image's (what ``--flip-tta`` computes inside
    resnet8/resnet9, here for any model, whatever it was trained with)."""
    import torch
    from torch.utils.data import DataLoader

    from training.checkpoint import load_checkpoint
    from training.data import load_splits
    from training.models import build_model

    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt["arch"], **{k: v for k, v in ckpt["arch_args"].items() if k != "flip_tta"})
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    test = load_splits("fashion-mnist", str(data_dir), val_fraction=0.0).test
    plain = tta = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=500):
            logits = model(x)
            plain += int((logits.argmax(1) == y).sum())
            tta += int(((logits + model(x.flip(-1))).argmax(1) == y).sum())
    return plain / len(test), tta / len(test)


def tta_serving_cost(checkpoint: Path, rounds: int = 20) -> dict[str, dict]:
    """What flip TTA costs a served request: the checkpoint exported to ONNX with and without it, run
    by ONNX Runtime on one thread (as a served worker runs it), batch-1 p50 latency and batch-64
    images/s measured side by side (``export.measure.latency``)."""
    import tempfile

    from export.measure import latency
    from export.runtime import _load_onnx
    from export.variants import export_onnx
    from training.checkpoint import load_checkpoint
    from training.contract import Contract
    from training.models import build_model

    ckpt = load_checkpoint(checkpoint)
    contract = Contract.from_dict(ckpt["contract"])
    predicts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tta in (("onnx-fp32", False), ("onnx-fp32 + flip TTA", True)):
            model = build_model(ckpt["arch"], **{**ckpt["arch_args"], "flip_tta": tta})
            model.load_state_dict(ckpt["state_dict"])
            path = Path(tmp) / f"{tta}.onnx"
            export_onnx(model.eval(), contract, path)
            run, _ = _load_onnx(path, "cpu", threads=1)
            predicts[name] = lambda pixels, run=run: run(pixels)[0]
        return latency(predicts, contract, rounds=rounds)


def run_config(name: str, seed: int, data_dir: Path, runs_dir: Path, fresh: bool) -> SweepRun:
    """Train one configuration with one seed, or read back the finished run of the same command."""
    run = f"{name}-s{seed}"
    saved = runs_dir / run / "sweep.json"
    train_args = [*CONFIGS[name], "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--val-fraction", "0",
                  "--seed", str(seed)]
    command = "python -m training train " + shlex.join(train_args)
    if saved.is_file() and not fresh:
        d = json.loads(saved.read_text())
        if d["command"] == command:
            print(f"reusing {saved}", file=sys.stderr)
            return SweepRun(**{**d, "curve": [tuple(r) for r in d["curve"]]})
        print(f"{saved} ran another command ({d['command']}); training again", file=sys.stderr)
    # 7 x 15 steps (~1 s each at width 16): 5 x 6 gave trainer/ceiling ratios from 0.79 to 1.24
    ceiling = config_ceiling(train_args, channels=1, size=28, rounds=7, steps=15)
    res = run_training(train_args, runs_dir, run)
    out = SweepRun(name, seed, command, curve(res.history), ceiling,
                   *final_accuracies(runs_dir / run / "last.pt", data_dir), res.wall_s)
    atomic_write_json(saved, asdict(out))
    return out


def _fmt_time(s: float | None) -> str:
    return "-" if s is None else f"{s:.0f}"


def tta_cost_line(config: str, cost: dict[str, dict]) -> str:
    plain, tta = cost["onnx-fp32"], cost["onnx-fp32 + flip TTA"]
    return (f"Serving cost of flip TTA ({config}'s weights exported to ONNX with and without it, ONNX Runtime on "
            f"one thread as a served worker runs it, side by side): batch-1 p50 {plain['batch1_p50_ms']:.3f} ms "
            f"-> {tta['batch1_p50_ms']:.3f} ms, batch 64 {plain['batch64_images_per_s']:,.0f} -> "
            f"{tta['batch64_images_per_s']:,.0f} images/s.")


def section(runs: list[SweepRun], machine: str, tta_cost: str = "") -> str:
    by_config: dict[str, list[SweepRun]] = {}
    for r in runs:
        by_config.setdefault(r.config, []).append(r)
    rows = []
    for name, rs in by_config.items():
        r0 = rs[0]
        rows.append(
            f"| {name} | `{shlex.join(CONFIGS[name])}` | {len(rs)} "
            f"| {statistics.mean(r.plain_accuracy for r in rs):.4f} "
            f"| {statistics.mean(r.tta_accuracy for r in rs):.4f} | {r0.curve[-1][1]:.0f} | "
            + " | ".join(_fmt_time(time_to(r0.curve, t)) for t in TIME_TO_TARGETS)
            + f" | {r0.trainer_images_per_s:,.0f} | {r0.ceiling_images_per_s:,.0f} "
            f"| {r0.trainer_images_per_s / r0.ceiling_images_per_s:.2f} |"
        )
    seeded = [
        f"- {name}, seeds {', '.join(str(r.seed) for r in rs)}: final test accuracy without TTA "
        f"{statistics.mean(a):.4f} mean ({min(a):.4f}-{max(a):.4f}), with flip TTA {statistics.mean(t):.4f} "
        f"({min(t):.4f}-{max(t):.4f}); seconds {statistics.mean(sec):.0f} ({min(sec):.0f}-{max(sec):.0f}); best "
        f"within {FASHION_BUDGET_S:.0f} s (per-epoch evaluation) {statistics.mean(w):.4f} ({min(w):.4f}-{max(w):.4f})"
        for name, rs in by_config.items()
        if len(rs) > 1
        for a, t, sec, w in [(
            [r.plain_accuracy for r in rs],
            [r.tta_accuracy for r in rs],
            [r.curve[-1][1] for r in rs],
            [r.best_within() or 0.0 for r in rs],
        )]
    ]
    return "\n".join([
        "## Training: Fashion-MNIST recipe sweep (CPU)",
        "",
        f"`bench/sweep_train.py` (`make bench-sweep`); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"{machine}. Every run is `python -m training train ARGS --dataset fashion-mnist --data-dir "
        f"{FASHION_DIR} --val-fraction 0 --seed S`: its whole schedule, evaluated on the 10,000 test images "
        f"after each epoch. Seconds: training plus those evaluations; seconds to each accuracy are read off "
        f"those evaluations (with flip TTA where ARGS has `--flip-tta`). Final accuracy: the last weights "
        f"evaluated again without and with flip TTA. Ceiling: the same optimizer step on a fixed random "
        f"batch, measured just before the run. Rows with several seeds show seed 0's seconds and curve and "
        f"the mean accuracies.",
        "",
        "| config | ARGS | seeds | final accuracy, no TTA | with flip TTA | seconds | s to 90 % | s to 92 % "
        "| s to 93 % | s to 94 % | trainer images/s | ceiling images/s | trainer / ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *seeded,
        *(["", tta_cost] if tta_cost else []),
        "",
        "![Fashion-MNIST time to accuracy per recipe](bench_sweep_train.png)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configuration names")
    p.add_argument("--seeds", default="0", help=f"comma-separated seeds ({RECIPE}: always {RECIPE_SEEDS})")
    p.add_argument("--data-dir", type=Path, default=FASHION_DIR)
    p.add_argument("--runs-dir", type=Path, default=REPO / "reports" / "sweep")
    p.add_argument("--fresh", action="store_true", help="train again even where a finished run is on disk")
    p.add_argument("--docs", type=Path, help="write the section (and the plot beside it) into this Markdown file")
    p.add_argument("--json", type=Path, help="write every run's record here")
    p.add_argument("--tta-cost", metavar="CONFIG", default=RECIPE,
                   help="export this configuration's seed-0 weights with and without flip TTA and time both "
                   "('' : skip)")
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n]
    unknown = [n for n in [*names, *([a.tta_cost] if a.tta_cost else [])] if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {a.seeds!r}")
    data_dir = ensure_fashion(a.data_dir)
    load_before = os.getloadavg()[0]
    runs = [run_config(n, s, data_dir, a.runs_dir, a.fresh) for n in names
            for s in (RECIPE_SEEDS if n == RECIPE else seeds)]
    cost = ""
    if a.tta_cost in names:  # its seed-0 weights are on disk now
        cost = tta_cost_line(a.tta_cost, tta_serving_cost(a.runs_dir / f"{a.tta_cost}-s0" / "last.pt"))
    text = section(runs, machine_line(load_before), cost)
    print(text)
    if a.docs:
        plot_curves({f"{r.config} s{r.seed}": r.curve for r in runs}, a.docs.parent / "bench_sweep_train.png",
                    "Fashion-MNIST recipes, each its whole schedule")
        update_section(a.docs, "bench-sweep-train", text)
    if a.json:
        atomic_write_json(a.json, [asdict(r) for r in runs])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
