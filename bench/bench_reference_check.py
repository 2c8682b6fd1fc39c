"""Each exported variant's reference check (the one every serving worker runs at load) under oneDNN ISA
limits, as a markdown table: does the same artifact give the same answers on a smaller ISA?

    python bench/bench_reference_check.py artifacts/digits [--isa DEFAULT,AVX2]

Each ISA runs in a fresh process (``ONEDNN_MAX_CPU_ISA`` is read once, when oneDNN starts): every
variant is loaded through ``export.runtime.load_variant`` (1 thread) and checked with
``export.runtime.reference_check`` against the manifest's gates; load and check times are one cold
call each (the check includes the runtime's first-call set-up).
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact_dir", help="artifacts/<RUN>/ with manifest.json and reference.npz")
    p.add_argument("--isa", default="DEFAULT,AVX2",
                   help="comma-separated ONEDNN_MAX_CPU_ISA values; DEFAULT leaves it unset")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the child process
    a = p.parse_args(argv)
    if a.probe:
        print(json.dumps(probe(a.artifact_dir)))
        return 0
    from export.core import cpu_name

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
