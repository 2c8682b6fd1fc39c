"""Latency of every exported variant against eager PyTorch, side by side, as a markdown table.

    python bench/bench_export.py artifacts/digits artifacts/cifarnet [--threads 1,2] [--rounds 30]
        [--ort-profile] [--out FILE]

For each run: reloads the trained model from the checkpoint the manifest names (its sha256 checked)
as the eager fp32 baseline, loads each variant through ``export.runtime.load_variant``, and measures
p50 latency at batch 1 and images/s at batch 64 with each thread count, the runtimes taking turns in
every round (``export.measure.latency``) so that load on a shared machine hits them alike. Accuracy
comes from the manifest (held-out test split, measured at export). Prints markdown; ``--out`` also
writes it to a file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


from export.core import latency_table  # noqa: E402
from training.machine import cpu_name  # noqa: E402
from export.runtime import read_manifest, verify_file  # noqa: E402
from training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from training.files import atomic_write_text  # noqa: E402
from training.contract import Contract  # noqa: E402

# What exporting must buy, one thread: ORT fp32 2.5x eager at batch 1 (the graph without Python's
# per-op dispatch, which dominates a small model's latency); the best INT8 variant 2.5x eager and 1.3x
# ORT fp32 in images/s at batch 64, or its accuracy cost buys nothing.
TARGET_ORT_B1, TARGET_INT8_VS_EAGER, TARGET_INT8_VS_ORT = 2.5, 2.5, 1.3


def bench_run(artifact_dir: Path, threads: tuple[int, ...], rounds: int) -> list[str]:
    manifest = read_manifest(artifact_dir)
    src = manifest["source"]
    verify_file(src["checkpoint"], src["sha256"])  # the baseline is the model that was exported
    model, contract = model_from_checkpoint(load_checkpoint(src["checkpoint"]))
    names = list(manifest["variants"])
    table = latency_table(artifact_dir, names, model, contract, threads, rounds)
    base_acc = manifest["baseline"]["accuracy"]
    acc = {"eager-fp32": base_acc, **{n: manifest["variants"][n]["accuracy"] for n in names}}
    t1 = table[f"threads_{threads[0]}"]
    eager = t1["eager-fp32"]

    lines = [f"**{manifest['name']}** ({src['arch']} on {src['dataset']}, version {manifest['version']}; "
             f"accuracy on {manifest['heldout']['samples']} held-out test images; "
             f"CPU default: {manifest['default_variant']['cpu']})", "",
             "| variant | accuracy | " + " | ".join(f"{t}T b1 p50 ms | {t}T b64 img/s" for t in threads)
             + f" | b1 speed-up vs eager ({threads[0]}T) | b64 img/s vs eager ({threads[0]}T) |",
             "|---|---|" + "---|---|" * len(threads) + "---|---|"]
    for name in ["eager-fp32", *names]:
        cells = [f"{acc[name]:.4f}"]
        for t in threads:
            n = table[f"threads_{t}"][name]
            cells += [f"{n['batch1_p50_ms']:.3f}", f"{n['batch64_images_per_s']:,.0f}"]
        n = t1[name]
        cells += [f"{eager['batch1_p50_ms'] / n['batch1_p50_ms']:.2f}x",
                  f"{n['batch64_images_per_s'] / eager['batch64_images_per_s']:.2f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    lines.append("")
    if "onnx-fp32" in t1:
        r = eager["batch1_p50_ms"] / t1["onnx-fp32"]["batch1_p50_ms"]
        lines.append(f"- ORT fp32 vs eager at batch 1, {threads[0]} thread: {r:.2f}x "
                     f"(target >= {TARGET_ORT_B1}x: {'met' if r >= TARGET_ORT_B1 else 'missed'})")
    int8 = [n for n in names if manifest["variants"][n]["precision"] == "int8"]
    if int8:
        best = max(int8, key=lambda n: t1[n]["batch64_images_per_s"])
        ips = t1[best]["batch64_images_per_s"]
        vs_eager = ips / eager["batch64_images_per_s"]
        change = (acc[best] - base_acc) * 100
        limit = manifest["gates"]["int8_max_drop_points"]
        line = (f"- best INT8 ({best}) at batch 64, {threads[0]} thread: {vs_eager:.2f}x eager images/s "
                f"(target >= {TARGET_INT8_VS_EAGER}x: {'met' if vs_eager >= TARGET_INT8_VS_EAGER else 'missed'})")
        if "onnx-fp32" in t1:
            vs_ort = ips / t1["onnx-fp32"]["batch64_images_per_s"]
            line += (f", {vs_ort:.2f}x ORT fp32 (target >= {TARGET_INT8_VS_ORT}x: "
                     f"{'met' if vs_ort >= TARGET_INT8_VS_ORT else 'missed'})")
        lines.append(line + f"; accuracy {change:+.2f} points vs fp32 (export gate: at most {limit:g} "
                     f"points lost)")
    return lines


def ort_profile(artifact_dir: Path, variant: str = "onnx-fp32", calls: int = 2000) -> list[str]:
    """Where one ORT thread spends a batch-1 call: median kernel time per graph node (ORT's profiler)."""
    import json

    import numpy as np
    import onnxruntime as ort

    manifest = read_manifest(artifact_dir)
    entry = manifest["variants"][variant]
    verify_file(artifact_dir / entry["file"], entry["sha256"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_export_ort")
    session = ort.InferenceSession(str(artifact_dir / entry["file"]), opts, providers=["CPUExecutionProvider"])
    shape = (1, *Contract.from_dict(manifest["contract"]).input_shape)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    feed = {session.get_inputs()[0].name: pixels}
    for _ in range(calls):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_node: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            key = (e["args"]["op_name"], e["name"].removesuffix("_kernel_time"))
            per_node.setdefault(key, []).append(e["dur"])
    medians = {k: float(np.median(v)) for k, v in per_node.items()}
    total = sum(medians.values())
    runs = float(np.median([e["dur"] for e in events if e.get("name") == "model_run"]))
    lines = [f"ORT profile of {manifest['name']} {variant}, batch 1, 1 thread, median of {calls} calls: "
             f"{runs:.0f} us per run, of which {total:.0f} us in kernels", "",
             "| op | node | median us | share of kernel time |", "|---|---|---|---|"]
    for (op, node), us in sorted(medians.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {op} | {node} | {us:.0f} | {us / total:.0%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact_dirs", nargs="+", type=Path)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts; the first is the reference")
    p.add_argument("--rounds", type=int, default=30, help="rounds of 10 batch-1 and 1 batch-64 calls each")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--ort-profile", action="store_true",
                   help="also show where ORT fp32 spends a batch-1 call, node by node")
    a = p.parse_args(argv)
    threads = tuple(int(t) for t in a.threads.split(","))
    lines = [f"CPU: {cpu_name()}; p50 = median over {a.rounds * 10} batch-1 calls and {a.rounds} "
             f"batch-64 calls per runtime, runtimes interleaved.", ""]
    try:
        for d in a.artifact_dirs:
            lines += bench_run(d, threads, a.rounds) + [""]
            if a.ort_profile:
                lines += ort_profile(d) + [""]
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    text = "\n".join(lines)
    print(text)
    if a.out:
        atomic_write_text(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
