"""Every GPU check and number the stages ask for, in one command on a machine with CUDA.

    python bench/bench_gpu.py --out DIR [--runs-dir runs] [--quick]

CI never has a GPU; this runs where one is lent and writes DIR/gpu.md (the markdown section for
docs/benchmarks.md) and DIR/gpu.json. In order:

1. the machine: GPU, driver, torch/CUDA/cuDNN, ONNX Runtime and its execution providers;
2. training, compute ceiling: ``bench_train.step_rates`` for cifarnet and resnet9 on 3x32x32 inputs,
   fp32 / bf16 / fp16 autocast x channels_last;
3. training, the real trainer (``python -m training train --device cuda``) on CIFAR-10-shaped data:
   50,000 + 10,000 pattern images written as real CIFAR-10 pickle batches (``training/datafiles.py``;
   no CIFAR-10 download is possible offline), per-epoch seconds and images/s, fp32 vs bf16 +
   channels_last vs fp16 (GradScaler);
4. export: ``python -m export`` of the ``digits`` checkpoint (``<runs-dir>/digits/best.pt``) and of the
   cifarnet trained in 3, then batch-1 latency and batch-256 images/s on CUDA (eager, TorchScript,
   ORT's CUDA execution provider when this onnxruntime has it) beside ORT on the CPU, side by side;
   parity of the CUDA variants against eager on the CPU;
5. serving: the inference core over the CUDA runner (PNG bytes in, top-k out) at batch 1 and 64, and
   the TorchServe handler (``ClassifierHandler.initialize`` with ``gpu_id=0``, then ``handle``) when
   the ``ts`` package is importable, to show the device it reports.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]

STEP_MODELS = "cifarnet,resnet9"
PRECISIONS = {"fp32": [], "bf16+channels_last": ["--precision", "bf16", "--channels-last"],
              "fp16 (GradScaler)": ["--precision", "fp16"]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kw)


def section(title: str, fn, md: list[str], results: dict, key: str) -> None:
    """Run one part; a failure is recorded (with its traceback) and the next part still runs."""
    log(title)
    md += ["", f"### {title}", ""]
    t0 = time.perf_counter()
    try:
        results[key] = fn(md)
    except Exception as e:  # noqa: BLE001 -- a report: say what broke and go on
        results[key] = {"error": f"{type(e).__name__}: {e}"}
        md += [f"FAILED: `{type(e).__name__}: {str(e)[:500]}`", "", "```", traceback.format_exc()[-1500:], "```"]
    log(f"{title}: {time.perf_counter() - t0:.0f} s")


# ---- 1. machine ----------------------------------------------------------------------------------
def machine(md: list[str]) -> dict:
    import onnxruntime as ort
    import torch

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    info = {"gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "nvidia_smi": smi, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "onnxruntime": ort.__version__,
            "ort_providers": ort.get_available_providers(), "cpu_cores": os.cpu_count(),
            "python": sys.version.split()[0]}
    md += [f"- GPU: **{info['gpu']}** (compute capability {info['capability']}); nvidia-smi: `{smi}`",
           f"- torch {info['torch']} (CUDA {info['cuda']}, cuDNN {info['cudnn']}), Python {info['python']}, "
           f"{info['cpu_cores']} CPU cores",
           f"- onnxruntime {info['onnxruntime']}, providers: {', '.join(info['ort_providers'])}"]
    return info


# ---- 2. training step ceiling --------------------------------------------------------------------
def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench/bench_train.py")
    mod = sys.modules["bench_train"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_steps(md: list[str], batch: int, rounds: int) -> list:
    rates = _bench_train().step_rates(STEP_MODELS.split(","), batch, rounds, device="cuda", channels=3, size=32)
    base = {m: ips for m, p, cl, ips in rates if p == "fp32" and not cl}
    md += [f"One AdamW step on random 3x32x32 inputs, batch {batch}, median of {rounds} interleaved rounds of "
           f"10 steps (`bench_train.step_rates`, no data loading).", "",
           "| model | precision | channels_last | images/s | vs fp32 |", "|---|---|---|---|---|",
           *[f"| {m} | {p} | {'yes' if cl else 'no'} | {ips:,.0f} | {ips / base[m]:.2f}x |" for m, p, cl, ips in rates]]
    return rates


# ---- 3. the real trainer on CIFAR-10-shaped data -------------------------------------------------
def train_epochs(md: list[str], data_root: Path, runs_dir: Path, epochs: int, workers: int) -> dict:
    from training.datafiles import write_cifar10

    from training.checkpoint import load_checkpoint

    if not (data_root / "cifar-10-batches-py" / "test_batch").exists():
        write_cifar10(data_root, per_batch=10_000, n_test=10_000)
    out = {}
    md += [f"`python -m training train --dataset cifar10 --data-dir <pattern batches> --device cuda --epochs "
           f"{epochs} --batch-size 512 --workers {workers}` (crop-flip augmentation, OneCycle); seconds per "
           f"epoch include the per-epoch evaluation; the median is over epochs 2..{epochs} (epoch 1 includes "
           "cuDNN autotuning and worker start-up).", "",
           "| model | precision | epoch seconds (median) | training images/s (median) | final val accuracy |",
           "|---|---|---|---|---|"]
    for model in STEP_MODELS.split(","):
        for tag, extra in PRECISIONS.items():
            run_name = f"{model}-{tag.split()[0].replace('+', '-')}"
            res = run([sys.executable, "-m", "training", "train", "--run", run_name, "--runs-dir", str(runs_dir),
                       "--model", model, "--dataset", "cifar10", "--data-dir", str(data_root), "--device", "cuda",
                       "--epochs", str(epochs), "--batch-size", "512", "--workers", str(workers),
                       "--no-tensorboard", *extra])
            if res.returncode != 0:
                md.append(f"| {model} | {tag} | FAILED (exit {res.returncode}) | | |")
                out[run_name] = {"error": res.stdout[-2000:]}
                continue
            hist = load_checkpoint(runs_dir / run_name / "last.pt")["history"]
            later = hist[1:] or hist
            secs = statistics.median(h["seconds"] for h in later)
            ips = statistics.median(h["images_per_s"] for h in later)
            out[run_name] = {"history": hist}
            md.append(f"| {model} | {tag} | {secs:.2f} | {ips:,.0f} | {hist[-1]['val_accuracy']:.4f} |")
    return out


# ---- 4. export and CUDA latency --------------------------------------------------------------------
def export_and_latency(md: list[str], runs: dict[str, tuple[Path, list[str]]], art_dir: Path,
                       rounds: int) -> dict:
    import onnxruntime as ort

    from export.measure import eager_predict, latency, parity
    from export.runtime import load_variant, read_manifest
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    out = {}
    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    for run_name, (runs_dir, extra) in runs.items():
        res = run([sys.executable, "-m", "export", "--run", run_name, "--runs-dir", str(runs_dir),
                   "--out-dir", str(art_dir), "--latency-rounds", "5", *extra])
        md += [f"**{run_name}**: `python -m export --run {run_name} {' '.join(extra)}` exited {res.returncode}; "
               "its report:", "", "```", *[ln for ln in res.stdout.splitlines() if ln.startswith(f"{run_name}:")][-12:],
               "```", ""]
        if res.returncode != 0:
            out[run_name] = {"export_error": res.stdout[-3000:]}
            continue
        adir = art_dir / run_name
        manifest = read_manifest(adir)
        ckpt = runs_dir / run_name / "best.pt"
        model, contract = model_from_checkpoint(load_checkpoint(ckpt))
        reference_predict = eager_predict(copy.deepcopy(model), contract)  # on the CPU
        predicts = {"eager-fp32 cuda": eager_predict(model, contract, device="cuda")}
        for variant, entry in manifest["variants"].items():
            if "cuda" in entry.get("devices", []) and (entry["runtime"] != "onnxruntime" or cuda_ep):
                predicts[f"{variant} cuda"] = load_variant(adir, variant, device="cuda")
        for variant in ("onnx-fp32", "onnx-int8"):
            if variant in manifest["variants"]:
                predicts[f"{variant} cpu (ORT, {os.cpu_count()} threads)"] = load_variant(adir, variant, device="cpu")
        rng = np.random.default_rng(1)
        check = rng.integers(0, 256, (512, *contract.input_shape), dtype=np.uint8)
        reference = reference_predict(check)
        par = {name: parity(reference, p(check)) for name, p in predicts.items() if "cuda" in name}
        lat = latency(predicts, contract, rounds=rounds, big_batch=256)
        base = lat["eager-fp32 cuda"]
        md += [f"{run_name} latency, median of {rounds} interleaved rounds (numpy uint8 in, logits out: "
               "host-device copies included, as a server pays them); parity on 512 random inputs against "
               "eager fp32 on the CPU:", "",
               "| runtime | batch 1 p50 ms | batch 256 p50 ms | batch 256 images/s | vs eager cuda (b256) | "
               "top-1 agreement | max abs diff |", "|---|---|---|---|---|---|---|"]
        for name, r in lat.items():
            p = par.get(name, {})
            md.append(f"| {name} | {r['batch1_p50_ms']:.3f} | {r['batch256_p50_ms']:.3f} | "
                      f"{r['batch256_images_per_s']:,.0f} | "
                      f"{r['batch256_images_per_s'] / base['batch256_images_per_s']:.2f}x | "
                      f"{p.get('top1_agreement', float('nan')):.4f} | {p.get('max_abs_diff', float('nan')):.2e} |")
        if not cuda_ep:
            md += ["", "ONNX on CUDA: not measured: this machine's onnxruntime has no CUDAExecutionProvider "
                       "(onnxruntime-gpu is not installed there and cannot be fetched; the CUDA image installs it)."]
        md.append("")
        out[run_name] = {"manifest_default": manifest["default_variant"], "latency": lat, "parity": par}
    return out


# ---- 5. serving on CUDA --------------------------------------------------------------------------
def _pngs(contract, n: int) -> list[bytes]:
    from PIL import Image

    from training.datafiles import pattern_images

    images, _ = pattern_images(n, contract.height, contract.width, contract.channels, seed=3)
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if contract.channels == 1 else img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def serving(md: list[str], art_dir: Path, rounds: int, devices=("cuda", "cpu")) -> dict:
    from export.runtime import load_variant, read_manifest
    from serving.core import InferenceCore

    out, answers = {}, []
    md += ["Inference core (`serving.core.InferenceCore.classify`: PNG decode, contract resize, model, top-k), "
           f"median of {rounds} rounds:", "",
           "| run | variant | device | batch 1 ms | batch 64 ms | batch 64 images/s |", "|---|---|---|---|---|---|"]
    for adir in sorted(p for p in art_dir.iterdir() if (p / "manifest.json").exists()):
        manifest = read_manifest(adir)
        for device in devices:
            runner = load_variant(adir, None, device=device)  # the manifest's default for the device
            core = InferenceCore(runner)
            pngs = _pngs(core.contract, 64)
            for _ in range(3):
                core.classify(pngs[:1])
                core.classify(pngs)
            t1, t64 = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                core.classify(pngs[:1])
                t1.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                core.classify(pngs)
                t64.append(time.perf_counter() - t0)
            b1, b64 = statistics.median(t1) * 1e3, statistics.median(t64) * 1e3
            out[f"{adir.name}/{device}"] = {"variant": runner.variant, "device": runner.device,
                                            "batch1_ms": b1, "batch64_ms": b64}
            md.append(f"| {adir.name} | {runner.variant} | {runner.device} | {b1:.2f} | {b64:.2f} | "
                      f"{64e3 / b64:,.0f} |")
        # The TorchServe handler itself, as a worker given gpu_id 0 would run it.
        try:
            from serving.handler import ClassifierHandler
        except ImportError as e:
            answers.append(f"Handler: not run (`{e}`).")
            continue
        handler = ClassifierHandler()
        ctx = SimpleNamespace(system_properties={"model_dir": str(adir), "gpu_id": 0},
                              model_name=manifest["name"], metrics=None, model_yaml_config=None)
        handler.initialize(ctx)
        answer = json.loads(handler.handle([{"body": _pngs(handler.core.contract, 1)[0]}], None)[0])
        out[f"{adir.name}/handler"] = answer
        answers.append(f"Handler `{adir.name}` with `gpu_id=0`: answered `{json.dumps(answer)[:400]}`")
    md += ["", *[line for a in answers for line in (a, "")]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs", help="holds digits/best.pt")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-gpu"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="fewer rounds and epochs (a smoke of this script)")
    a = p.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("error: no CUDA device here; bench/bench_gpu.py runs on a GPU machine", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    rounds = 5 if a.quick else 20
    a.out.mkdir(parents=True, exist_ok=True)
    work_runs, data_root, art_dir = a.work / "runs", a.work / "cifar", a.work / "artifacts"
    shutil.rmtree(a.work / "artifacts", ignore_errors=True)
    md = [f"## GPU ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `python bench/bench_gpu.py`)"]
    results: dict = {}
    section("Machine", machine, md, results, "machine")
    section("Training: compute ceiling per step", lambda m: train_steps(m, 512, rounds), md, results, "steps")
    section("Training: the trainer on CIFAR-10-shaped data",
            lambda m: train_epochs(m, data_root, work_runs, 2 if a.quick else a.epochs, a.workers), md, results, "epochs")
    runs = {"digits": (a.runs_dir, [])}
    if (work_runs / "cifarnet-fp32" / "best.pt").exists():
        shutil.copytree(work_runs / "cifarnet-fp32", work_runs / "cifarnet", dirs_exist_ok=True)
        runs["cifarnet"] = (work_runs, ["--data-dir", str(data_root)])
    section("Export: variants on CUDA", lambda m: export_and_latency(m, runs, art_dir, rounds), md, results, "export")
    section("Serving on CUDA", lambda m: serving(m, art_dir, rounds), md, results, "serving")
    text = "\n".join(md) + "\n"
    (a.out / "gpu.md").write_text(text)
    (a.out / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
