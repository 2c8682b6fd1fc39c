"""Each exported variant's reference check (the one every serving worker runs at load) under oneDNN ISA
limits, as a markdown table: does the same artifact give the same answers on a smaller ISA?

    python bench/bench_reference_check.py artifacts/digits [--isa DEFAULT,AVX2] [--ort-reduce-range]

Each ISA runs in a fresh process (``ONEDNN_MAX_CPU_ISA`` is read once, when oneDNN starts): every
variant is loaded through ``export.runtime.load_variant`` (1 thread) and checked with
``export.runtime.reference_check`` against the manifest's gates; load and check times are one cold
call each (the check includes the runtime's first-call set-up). ``--ort-reduce-range`` also quantizes
the artifact's onnx-fp32 graph with ORT twice (MinMax, 512 training images), 7-bit weights
(``reduce_range``, export's default) and full 8-bit, and checks both on the reference batch and the
whole test split against eager fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def probe(artifact_dir: str) -> dict:
    """{variant: numbers} for this process's ISA."""
    from export.runtime import load_reference, load_variant, read_manifest, reference_check

    manifest = read_manifest(artifact_dir)
    ref = load_reference(artifact_dir, manifest)
    out = {}
    for name in manifest["variants"]:
        t0 = time.perf_counter()
        runner = load_variant(artifact_dir, name, threads=1)
        t1 = time.perf_counter()
        numbers, why = reference_check(runner(ref.images), ref, runner.precision, manifest["gates"])
        out[name] = {**numbers, "passed": why is None, "load_ms": (t1 - t0) * 1e3,
                     "check_ms": (time.perf_counter() - t1) * 1e3}
    return out


def reduce_range_rows(artifact_dir: str) -> list[str]:
    """Markdown rows: ORT INT8 with and without reduce_range, on the reference batch and the test split."""
    import tempfile

    from export.data import load_pixels
    from export.measure import eager_predict, predict_all
    from export.runtime import LOADERS, MANIFEST_NAME, load_reference, read_manifest
    from export.variants import quantize_onnx
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    manifest = read_manifest(artifact_dir)
    if "onnx-fp32" not in manifest["variants"]:
        raise SystemExit(f"{Path(artifact_dir) / MANIFEST_NAME} has no onnx-fp32 to quantize")
    ref = load_reference(artifact_dir, manifest)
    ckpt = load_checkpoint(manifest["source"]["checkpoint"])
    model, contract = model_from_checkpoint(ckpt)
    kw = dict(dataset=ckpt["dataset"], data_dir=ckpt.get("config", {}).get("data_dir"), contract=contract,
              image_size=ckpt.get("config", {}).get("image_size"))
    calibration = load_pixels(split="train", limit=512, **kw).images
    test = load_pixels(split="test", **kw)
    eager_test = predict_all(eager_predict(model, contract), test.images).argmax(axis=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for reduce_range in (True, False):
            path = Path(tmp) / f"int8-{reduce_range}.onnx"
            quantize_onnx(Path(artifact_dir) / manifest["variants"]["onnx-fp32"]["file"], calibration, path,
                          reduce_range=reduce_range)
            predict, _ = LOADERS["onnxruntime"](path, "cpu", 1)
            on_ref = predict(ref.images).argmax(axis=1)
            on_test = predict_all(predict, test.images).argmax(axis=1)
            rows.append(f"| {reduce_range} | {(on_ref == ref.logits.argmax(axis=1)).mean():.4f} | "
                        f"{(on_ref == ref.labels).mean():.4f} | {(on_test == eager_test).mean():.4f} | "
                        f"{(on_test == test.labels).mean():.4f} (eager fp32 {(eager_test == test.labels).mean():.4f}, "
                        f"{len(test.labels)} images) |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact_dir", help="artifacts/<RUN>/ with manifest.json and reference.npz")
    p.add_argument("--isa", default="DEFAULT,AVX2",
                   help="comma-separated ONEDNN_MAX_CPU_ISA values; DEFAULT leaves it unset")
    p.add_argument("--ort-reduce-range", action="store_true",
                   help="also compare ORT INT8 with and without reduce_range (7-bit weights)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the child process
    a = p.parse_args(argv)
    if a.probe:
        print(json.dumps(probe(a.artifact_dir)))
        return 0
    from training.machine import cpu_name

    print(f"CPU: {cpu_name()}\n")
    print("| ISA limit | variant | top-1 agreement | accuracy (ref. batch) | max abs logit diff | passes | "
          "load ms | check ms |\n|---|---|---|---|---|---|---|---|")
    for isa in a.isa.split(","):
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        if isa != "DEFAULT":
            env["ONEDNN_MAX_CPU_ISA"] = isa
        proc = subprocess.run([sys.executable, __file__, a.artifact_dir, "--probe"], env=env, cwd=REPO,
                              capture_output=True, text=True, check=True)
        for name, n in json.loads(proc.stdout.strip().splitlines()[-1]).items():
            print(f"| {isa} | {name} | {n['top1_agreement']:.4f} | {n['accuracy']:.4f} | {n['max_abs_diff']:.4f} | "
                  f"{'yes' if n['passed'] else 'NO'} | {n['load_ms']:.0f} | {n['check_ms']:.0f} |")
    if a.ort_reduce_range:
        print("\n| ORT reduce_range | top-1 agreement (ref. batch) | accuracy (ref. batch) | "
              "top-1 agreement (test) | accuracy (test) |\n|---|---|---|---|---|")
        print("\n".join(reduce_range_rows(a.artifact_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
