"""Command line: ``python -m export --run RUN [options]``: checkpoint -> artifacts/<RUN>/.

Exit status 0 when the manifest is written (an INT8 variant that missed its gate with every recipe
is recorded as rejected, with one ``warning:`` line, and not published); 1 with one ``error: ...``
line naming the variant and its numbers when an fp32 variant fails its gate (or any does, with
``--strict``); 2 for a problem a user can fix before exporting (missing checkpoint or data, bad option).
"""

from __future__ import annotations

import argparse
import sys

from export.core import ExportConfig, GateError, export_run
from export.ood import METHODS as OOD_METHODS
from export.registry import REGISTRY
from export.runtime import IntegrityError
from training.cli import HelpFormatter, from_args
from training.data import DataNotFoundError


def _csv(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v.strip())


def parse_args(argv: list[str] | None = None) -> ExportConfig:
    d = ExportConfig(run="")
    p = argparse.ArgumentParser(
        prog="python -m export", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--run", required=True, help="run name: reads <runs-dir>/RUN/best.pt, writes <out-dir>/RUN/")
    io.add_argument("--runs-dir", default=d.runs_dir, help="where the training runs are")
    io.add_argument("--out-dir", default=d.out_dir, help="where artifacts/RUN/ goes")
    io.add_argument("--checkpoint", default=None, help="default: <runs-dir>/<run>/best.pt")
    io.add_argument("--data-dir", default=None, help="held-out/calibration data; default: the checkpoint's")
    io.add_argument(
        "--variants",
        type=_csv(str),
        default=d.variants,
        help=f"comma-separated subset of {','.join(REGISTRY)} (default: all)",
    )
    gates = p.add_argument_group("gates and the reference batch")
    gates.add_argument(
        "--check-size", type=int, default=d.check_size, help="held-out images for the fp32 parity gate (0: all)"
    )
    gates.add_argument("--atol", type=float, default=d.atol, help="max |logit diff| of fp32 variants vs eager")
    gates.add_argument(
        "--eval-size", type=int, default=d.eval_size, help="held-out images for accuracy (0: the whole test split)"
    )
    gates.add_argument(
        "--max-int8-drop", type=float, default=d.max_int8_drop, help="accuracy points INT8 may lose against eager fp32"
    )
    gates.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 1, publish nothing) when an INT8 variant is rejected by its gate; "
        "by default it is recorded as rejected and the others are published",
    )
    gates.add_argument(
        "--reference-size",
        type=int,
        default=d.reference_size,
        help="of the check images, how many ship as the reference batch every serving worker "
        "re-checks its variant on at load",
    )
    gates.add_argument(
        "--val-size",
        type=int,
        default=d.val_size,
        help="validation images (the checkpoint's own val split) the temperature is fitted on (0: all)",
    )
    int8 = p.add_argument_group("INT8")
    int8.add_argument("--calib-size", type=int, default=d.calib_size, help="training images for INT8 calibration")
    int8.add_argument(
        "--quant-backend", default=d.quant_backend, choices=("x86", "fbgemm", "qnnpack"), help="PyTorch FX INT8 kernels"
    )
    int8.add_argument(
        "--ort-reduce-range",
        action=argparse.BooleanOptionalAction,
        default=d.ort_reduce_range,
        help="7-bit ORT INT8 weights (on: full range saturates on AVX2 without VNNI)",
    )
    int8.add_argument(
        "--ort-activation",
        choices=("uint8", "int8"),
        default=d.ort_activation,
        help="ONNX Runtime INT8 activation type",
    )
    det = p.add_argument_group("out-of-distribution detector (export/ood.py)")
    det.add_argument(
        "--ood-method",
        choices=(*OOD_METHODS, "none"),
        default=d.ood_method,
        help="the score every answer's ood flag is set from (none: no detector, no flag)",
    )
    det.add_argument(
        "--ood-acceptance",
        type=float,
        default=d.ood_acceptance,
        help="share of the validation split the threshold accepts as in distribution",
    )
    det.add_argument(
        "--ood-fit-size",
        type=int,
        default=d.ood_fit_size,
        help="training images (a seeded subset) the detector is fitted on (0: all)",
    )
    det.add_argument("--ood-knn-k", type=int, default=d.ood_knn_k, help="the neighbour knn measures to")
    misc = p.add_argument_group("latency and defaults")
    misc.add_argument(
        "--latency-threads",
        type=_csv(int),
        default=d.latency_threads,
        help="comma-separated thread counts to time every variant at",
    )
    misc.add_argument("--latency-rounds", type=int, default=d.latency_rounds, help="0 skips latency")
    misc.add_argument(
        "--cpu-default",
        choices=tuple(REGISTRY),
        default=None,
        help="default CPU variant (default: the fastest that passed its gates)",
    )
    misc.add_argument("--seed", type=int, default=d.seed, help="seeds the held-out and calibration samples")
    return from_args(ExportConfig, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    try:
        export_run(parse_args(argv))
    except GateError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, DataNotFoundError, IntegrityError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
