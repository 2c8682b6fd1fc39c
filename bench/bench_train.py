"""Training benchmarks on this machine's CPU, through the real CLI (``python -m training train``).

    python bench/bench_train.py fashion [--model bn_cnn --epochs 6 ...] [--docs docs/benchmarks.md]
    python bench/bench_train.py demo --demo-args "<the Makefile's DEMO_TRAIN_ARGS>" [--repeats 3]
    python bench/bench_train.py steps [--models mnist_cnn,bn_cnn] [--batch-size 128] [--device cuda ...]
    make bench-train     # both, and writes their sections of docs/benchmarks.md

``fashion``: real Fashion-MNIST (Debian's ``dataset-fashion-mnist``, installed when missing and apt
can). ``--val-fraction 0`` makes the per-epoch evaluation run on the official 10,000-image test split,
so ``last.pt``'s history *is* the time-to-accuracy curve: cumulative seconds of training plus
per-epoch evaluation (process start and data staging excluded, reported separately as wall time)
against test accuracy. No model is selected on the test split: the numbers quoted are each epoch's.

``demo``: ``make demo``'s training step, repeated; medians of training seconds and the held-out
accuracy that ``best.pt`` stores.

``steps``: the compute ceiling without data loading: images/s of one optimizer step on random
inputs per model x precision (fp32, bf16 autocast; fp16 too on CUDA) x memory format, the settings
taking turns in every round so that load on a shared machine hits them alike. With ``--device cuda
--models cifarnet,resnet9 --channels 3 --size 32`` it is the GPU benchmark on CIFAR-10-shaped data.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.docs import update_section  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# The targets.
FASHION_TARGET_ACC, FASHION_BUDGET_S = 0.92, 180.0
DEMO_TARGET_ACC, DEMO_BUDGET_S = 0.97, 60.0


@dataclass(frozen=True)
class TrainResult:
    args: list[str]
    wall_s: float
    history: list[dict]       # last.pt's per-epoch records
    best_metrics: dict        # best.pt's metrics (val/test accuracy, train_seconds)


def machine_line(load_before: float, device: str = "cpu") -> str:
    import torch
    gpu = "no GPU used" if device == "cpu" else device_line(device)
    from export.core import cpu_name

    return (f"{cpu_name()}, torch {torch.__version__} (intra-op threads "
            f"{torch.get_num_threads()}), {gpu}; 1-min load average {load_before:.2f} before the "
            f"runs, {os.getloadavg()[0]:.2f} after")


def ensure_fashion(data_dir: Path) -> Path:
    """The four IDX files, installing Debian's package when they are missing and apt can."""
    if all((data_dir / f).exists() for f in FASHION_FILES):
        return data_dir
    if data_dir == FASHION_DIR and shutil.which("apt-get"):
        cmd = ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]
        if os.geteuid() != 0:
            cmd = ["sudo", "-n", *cmd] if shutil.which("sudo") else []
        if cmd:
            print("installing Fashion-MNIST: " + " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    if all((data_dir / f).exists() for f in FASHION_FILES):
        return data_dir
    raise SystemExit(f"error: Fashion-MNIST IDX files not found in {data_dir}; install them with "
                     f"`apt-get install dataset-fashion-mnist` or pass --data-dir DIR holding {', '.join(FASHION_FILES)}")


def run_training(train_args: list[str], runs_dir: Path, run: str) -> TrainResult:
    cmd = [sys.executable, "-m", "training", "train", *train_args, "--run", run,
           "--runs-dir", str(runs_dir), "--no-tensorboard"]
    print("$ python " + shlex.join(cmd[1:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"error: training exited {out.returncode}: {out.stdout[-2000:]}")
    last = load_checkpoint(runs_dir / run / "last.pt")
    best = load_checkpoint(runs_dir / run / "best.pt")
    return TrainResult(train_args, wall, last["history"], best["metrics"])


# ---- Fashion-MNIST: time to accuracy -------------------------------------------------------------
def curve(history: list[dict]) -> list[tuple[int, float, float, float]]:
    """(epoch, cumulative seconds, test accuracy, training images/s) per epoch."""
    rows, total = [], 0.0
    for h in history:
        total += h["seconds"]
        rows.append((h["epoch"], total, h["val_accuracy"], h["images_per_s"]))
    return rows


def time_to(rows, target: float) -> float | None:
    return next((s for _, s, acc, _ in rows if acc >= target), None)


def fashion_section(res: TrainResult, plot_name: str | None, machine: str) -> str:
    rows = curve(res.history)
    reached = time_to(rows, FASHION_TARGET_ACC)
    within = [r for r in rows if r[1] <= FASHION_BUDGET_S]
    best_within = max((r[2] for r in within), default=None)
    if reached is not None and reached <= FASHION_BUDGET_S:
        epoch = next(e for e, s, _, _ in rows if s == reached)
        verdict = f"met: {FASHION_TARGET_ACC:.0%} first reached after {reached:.0f} s (epoch {epoch})"
    elif best_within is not None:
        verdict = f"MISSED: the best epoch within {FASHION_BUDGET_S:.0f} s reached {best_within:.4f}"
    else:
        verdict = f"MISSED: no epoch finished within {FASHION_BUDGET_S:.0f} s"
    lines = [
        "## Training: Fashion-MNIST time to accuracy (CPU)",
        "",
        f"`bench/bench_train.py` (`make bench-train`) ran `python -m training train {shlex.join(res.args)}` on real "
        f"Fashion-MNIST (60,000 training / 10,000 test images, Debian `dataset-fashion-mnist`); "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {machine}.",
        "",
        "Seconds are cumulative training plus per-epoch evaluation on the test split (`--val-fraction 0`); "
        f"the whole command took {res.wall_s:.0f} s of wall time (start-up and data staging included).",
        "",
        "| epoch | seconds | test accuracy | training images/s |",
        "|---|---|---|---|",
        *[f"| {e} | {s:.1f} | {acc:.4f} | {ips:,.0f} |" for e, s, acc, ips in rows],
        "",
        f"Target >= {FASHION_TARGET_ACC:.0%} test accuracy within {FASHION_BUDGET_S:.0f} s of training: {verdict}. "
        f"Median training throughput {statistics.median(r[3] for r in rows):,.0f} images/s.",
    ]
    if plot_name:
        lines += ["", f"![Fashion-MNIST time to accuracy]({plot_name})"]
    return "\n".join(lines)


def plot_curve(res: TrainResult, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = curve(res.history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r[1] for r in rows], [r[2] for r in rows], marker="o", label="test accuracy")
    ax.axhline(FASHION_TARGET_ACC, color="gray", linestyle="--", linewidth=1, label=f"{FASHION_TARGET_ACC:.0%} target")
    ax.axvline(FASHION_BUDGET_S, color="gray", linestyle=":", linewidth=1, label=f"{FASHION_BUDGET_S:.0f} s budget")
    ax.set_xlabel("training seconds (2-core CPU)")
    ax.set_ylabel("Fashion-MNIST test accuracy")
    ax.set_title(f"{res.args[res.args.index('--model') + 1]} on Fashion-MNIST", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)


# ---- make demo's training step ---------------------------------------------------------------------
def demo_section(results: list[TrainResult], machine: str) -> str:
    secs = [r.best_metrics["train_seconds"] for r in results]
    walls = [r.wall_s for r in results]
    accs = [r.best_metrics["test_accuracy"] for r in results]
    n = results[0].best_metrics["test_samples"]
    med_s, med_acc = statistics.median(secs), statistics.median(accs)
    ok = med_s < DEMO_BUDGET_S and med_acc >= DEMO_TARGET_ACC
    return "\n".join([
        "## Training: `make demo`'s training step (CPU)",
        "",
        f"`bench/bench_train.py` (`make bench-train`) ran `python -m training train {shlex.join(results[0].args)}` "
        f"{len(results)} times; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {machine}.",
        "",
        "| run | training seconds (epochs + evaluation) | wall seconds (whole command) | held-out test accuracy |",
        "|---|---|---|---|",
        *[f"| {i + 1} | {s:.1f} | {w:.1f} | {a:.4f} |" for i, (s, w, a) in enumerate(zip(secs, walls, accs))],
        "",
        f"Median: {med_s:.1f} s of training ({statistics.median(walls):.1f} s wall), test accuracy "
        f"{med_acc:.4f} on {n} held-out images. Target < {DEMO_BUDGET_S:.0f} s and >= {DEMO_TARGET_ACC:.0%}: "
        f"{'met' if ok else 'MISSED'}.",
    ])


# ---- compute ceiling: optimizer steps on random data ---------------------------------------------------
def step_rates(models: list[str], batch_size: int, rounds: int, *, device: str = "cpu",
               channels: int = 1, size: int = 28) -> list[tuple[str, str, bool, float]]:
    """(model, precision, channels_last, median images/s) for one AdamW step, settings interleaved.

    Precisions: fp32 and bf16 autocast everywhere, fp16 autocast with a GradScaler on CUDA.
    """
    import torch

    from training.engine import autocast
    from training.models import build_model

    torch.manual_seed(0)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    precisions = ("fp32", "bf16", "fp16") if dev.type == "cuda" else ("fp32", "bf16")
    settings = []
    for arch in models:
        for precision in precisions:
            for channels_last in (False, True):
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                model = build_model(arch, in_channels=channels, num_classes=10, image_size=size)
                model = model.to(dev, memory_format=fmt)
                x = torch.randn(batch_size, channels, size, size, device=dev).contiguous(memory_format=fmt)
                y = torch.randint(0, 10, (batch_size,), device=dev)
                scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
                settings.append((arch, precision, channels_last, model,
                                 torch.optim.AdamW(model.parameters(), 1e-3), scaler, x, y, []))

    def step(model, opt, scaler, x, y, precision):
        with autocast(dev, precision):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for r in range(rounds + 1):
        for arch, precision, _, model, opt, scaler, x, y, times in settings:
            sync()
            t0 = time.perf_counter()
            for _ in range(1 if dev.type == "cpu" else 10):  # GPU steps are short: time ten
                step(model, opt, scaler, x, y, precision)
            sync()
            if r:  # round 0 warms up (oneDNN primitives, cuDNN autotuning)
                times.append((time.perf_counter() - t0) / (1 if dev.type == "cpu" else 10))
    return [(a, p, cl, batch_size / statistics.median(t)) for a, p, cl, *_, t in settings]


def device_line(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    return "CPU"


def steps_section(rates, a, machine: str) -> str:
    return "\n".join([
        f"## Training: compute ceiling per optimizer step ({device_line(a.device)})",
        "",
        f"`python bench/bench_train.py steps --models {a.models} --batch-size {a.batch_size} --channels "
        f"{a.channels} --size {a.size} --device {a.device}` (random inputs, AdamW, median of {a.rounds} "
        f"interleaved rounds; no data loading); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {machine}.",
        "",
        "| model | precision | channels_last | images/s |",
        "|---|---|---|---|",
        *[f"| {m} | {p} | {'yes' if cl else 'no'} | {ips:,.0f} |" for m, p, cl, ips in rates],
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fashion", help="Fashion-MNIST time to accuracy")
    f.add_argument("--data-dir", type=Path, default=FASHION_DIR)
    f.add_argument("--model", default="bn_cnn")
    f.add_argument("--epochs", type=int, default=5)
    f.add_argument("--train-args", default="--precision bf16 --channels-last --workers 1 --augment none",
                   help="further `python -m training train` options")
    d = sub.add_parser("demo", help="make demo's training step")
    d.add_argument("--demo-args", required=True, help="the Makefile's DEMO_TRAIN_ARGS")
    d.add_argument("--repeats", type=int, default=3)
    st = sub.add_parser("steps", help="compute ceiling: images/s per optimizer step, no data loading")
    st.add_argument("--models", default="mnist_cnn,bn_cnn")
    st.add_argument("--batch-size", type=int, default=128)
    st.add_argument("--rounds", type=int, default=20)
    st.add_argument("--device", default="cpu", help="cpu or cuda (a GPU run: --models cifarnet,resnet9 "
                    "--channels 3 --size 32 --batch-size 512 --device cuda)")
    st.add_argument("--channels", type=int, default=1)
    st.add_argument("--size", type=int, default=28)
    for s in (f, d, st):
        s.add_argument("--docs", type=Path, default=None, help="write the section into this markdown file")
        s.add_argument("--runs-dir", type=Path, default=None, help="default: a temporary directory")
    a = p.parse_args(argv)

    load_before = os.getloadavg()[0]
    runs_dir = a.runs_dir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    if a.what == "fashion":
        data_dir = ensure_fashion(a.data_dir)
        args = ["--model", a.model, "--dataset", "fashion-mnist", "--data-dir", str(data_dir),
                "--epochs", str(a.epochs), "--val-fraction", "0", *shlex.split(a.train_args)]
        res = run_training(args, runs_dir, "fashion")
        plot_name = None
        if a.docs:
            plot_name = "bench_train_fashion.png"
            plot_curve(res, a.docs.parent / plot_name)
        section, key = fashion_section(res, plot_name, machine_line(load_before)), "bench-train-fashion"
    elif a.what == "steps":
        rates = step_rates(a.models.split(","), a.batch_size, a.rounds, device=a.device,
                           channels=a.channels, size=a.size)
        key = "bench-train-steps" + ("" if a.device == "cpu" else "-" + a.device.replace(":", ""))
        section = steps_section(rates, a, machine_line(load_before, a.device))
    else:
        demo_args = shlex.split(a.demo_args)
        if "--run" in demo_args:  # the bench names its own runs
            i = demo_args.index("--run")
            del demo_args[i:i + 2]
        results = [run_training(demo_args, runs_dir, f"demo{i}") for i in range(a.repeats)]
        section, key = demo_section(results, machine_line(load_before)), "bench-train-demo"
    print(section)
    if a.docs:
        update_section(a.docs, key, section)
        print(f"wrote {a.docs} ({key})", file=sys.stderr)
    if a.runs_dir is None:
        shutil.rmtree(runs_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
