"""``artifacts/<RUN>/`` -> ``model_store/<RUN>.mar`` with torch-model-archiver.

The archive holds ``handler.py`` (``serving/archive_entry.py``: it imports the handler from the
installed project), the export ``manifest.json`` unchanged, the variant file(s) the server will run
(the manifest's default for CPU and for CUDA unless told otherwise, plus an fp32 fallback when the CPU
one is INT8), the reference batch every worker checks its variant on, and ``model-config.yaml``
(TorchServe's batching and worker settings plus the handler's own section). Variant and reference
files are sha256-checked against the manifest before packing, and again by the worker when it loads them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from export.registry import REGISTRY
from export.runtime import MANIFEST_NAME, read_manifest, verify_file
from serving.core import Limits, check_min_confidence

ENTRY_FILE = Path(__file__).with_name("archive_entry.py")


@dataclass(frozen=True)
class ArchiveConfig:
    """What goes into one archive, parsed once at the edge (CLI / Makefile).

    Attributes:
        run: the run name: reads ``<artifacts_dir>/<run>/``, writes ``<model_store>/<run>.mar``, and is
            the name TorchServe serves it under.
        variant_cpu, variant_cuda: variants to pack and run; None = the manifest's defaults.
        batch_size, max_batch_delay_ms: TorchServe dynamic batching: a worker takes up to batch_size
            requests, waiting at most max_batch_delay_ms for the batch to fill.
        min_workers, max_workers: worker processes for this model.
        response_timeout_s: TorchServe kills a worker whose batch takes longer than this. The
            handler's limits keep a batch far below it (docs/serving.md, "Worst cases").
        job_queue_size: requests TorchServe queues for this model; past that it answers 503 (JSON) at
            once instead of letting waits pile up (100 = about 30 ms of work at the capacity
            bench-serve measured on 2 cores).
        threads: intra-op threads per worker (see docs/benchmarks.md, "Serve").
        limits: per-request limits the handler enforces.
        min_confidence: answers whose (calibrated) top probability is below it say ``"abstain":
            true``; 0 = never. A request's ``min_confidence`` option overrides it.
        ood_abstain: an image the out-of-distribution detector flags is answered ``"abstain": true``
            as well (False: only its ``ood`` flag says so).
    """

    run: str
    artifacts_dir: str = "artifacts"
    model_store: str = "model_store"
    variant_cpu: str | None = None
    variant_cuda: str | None = None
    batch_size: int = 8
    max_batch_delay_ms: int = 5
    # 2 workers x 1 thread: the bench-serve sweep's best on 2 cores (docs/benchmarks.md, "Serve").
    min_workers: int = 2
    max_workers: int = 2
    response_timeout_s: int = 30
    job_queue_size: int = 100
    threads: int = 1
    limits: Limits = Limits()
    min_confidence: float = 0.0
    ood_abstain: bool = True

    def __post_init__(self) -> None:
        for key in ("variant_cpu", "variant_cuda"):
            v = getattr(self, key)
            if v is not None and v not in REGISTRY:
                raise ValueError(f"{key} {v!r} is not one of {', '.join(REGISTRY)}")
        if (
            min(
                self.batch_size,
                self.min_workers,
                self.max_workers,
                self.response_timeout_s,
                self.threads,
                self.job_queue_size,
            )
            < 1
            or self.max_batch_delay_ms < 0
        ):
            raise ValueError(f"archive settings must be positive: {self}")
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers {self.min_workers} > max_workers {self.max_workers}")
        check_min_confidence(self.min_confidence)

    @property
    def artifact_dir(self) -> Path:
        return Path(self.artifacts_dir) / self.run

    @property
    def mar_path(self) -> Path:
        return Path(self.model_store) / f"{self.run}.mar"


def chosen_variants(manifest: dict, cfg: ArchiveConfig) -> tuple[str, str | None]:
    """(cpu variant, cuda variant) to pack; cuda is None when the manifest has none for CUDA."""
    cpu = cfg.variant_cpu or manifest["default_variant"].get("cpu")
    cuda = cfg.variant_cuda or manifest["default_variant"].get("cuda")
    for v in (cpu, cuda):
        if v is not None and v not in manifest["variants"]:
            raise ValueError(
                f"variant {v} is not in {cfg.artifact_dir / MANIFEST_NAME}; exported: {', '.join(manifest['variants'])}"
            )
    if cpu is None:
        raise ValueError(f"{cfg.artifact_dir / MANIFEST_NAME} names no CPU variant; pass --variant-cpu")
    return cpu, cuda


def packed_variants(manifest: dict, cpu: str, cuda: str | None) -> list[str]:
    """The chosen variants, plus an fp32 one for a worker to fall back to when its INT8 variant fails
    the reference check on the machine that serves it (onnx-fp32 first: the faster fp32 on CPU)."""
    chosen = [v for v in (cpu, cuda) if v is not None]
    if manifest["variants"][cpu]["precision"] != "fp32":
        fp32 = sorted(
            (v for v, e in manifest["variants"].items() if e["precision"] == "fp32"), key=lambda v: v != "onnx-fp32"
        )
        chosen += fp32[:1]
    return list(dict.fromkeys(chosen))


def model_config(cfg: ArchiveConfig, cpu: str, cuda: str | None) -> dict:
    """The archive's model-config.yaml: TorchServe's keys, and ``handler:`` for ClassifierHandler."""
    return {
        "minWorkers": cfg.min_workers,
        "maxWorkers": cfg.max_workers,
        "batchSize": cfg.batch_size,
        "maxBatchDelay": cfg.max_batch_delay_ms,
        "responseTimeout": cfg.response_timeout_s,
        "jobQueueSize": cfg.job_queue_size,
        "handler": {
            "variant_cpu": cpu,
            "variant_cuda": cuda,
            "threads": cfg.threads,
            "min_confidence": cfg.min_confidence,
            "ood_abstain": cfg.ood_abstain,
            **dataclasses.asdict(cfg.limits),
        },
    }


def build_archive(cfg: ArchiveConfig, log=print) -> Path:
    """Build ``<model_store>/<run>.mar``; returns its path. The old archive is replaced atomically."""
    manifest = read_manifest(cfg.artifact_dir)
    cpu, cuda = chosen_variants(manifest, cfg)
    if "reference" not in manifest:
        raise ValueError(
            f"{cfg.artifact_dir / MANIFEST_NAME} has no reference batch (exported before it "
            f"existed); re-run `make export RUN={cfg.run}`"
        )
    files = []
    # the variants, the reference batch and the out-of-distribution detector (absent from exports made
    # before it existed: such an archive serves without the ood flag)
    for entry in [
        *(manifest["variants"][v] for v in packed_variants(manifest, cpu, cuda)),
        manifest["reference"],
        *([manifest["ood"]] if "ood" in manifest else []),
    ]:
        verify_file(cfg.artifact_dir / entry["file"], entry["sha256"])
        files.append(cfg.artifact_dir / entry["file"])
    store = Path(cfg.model_store)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store, prefix=f".{cfg.run}.staging-") as tmp:
        staging = Path(tmp)
        shutil.copyfile(ENTRY_FILE, staging / "handler.py")
        shutil.copyfile(cfg.artifact_dir / MANIFEST_NAME, staging / MANIFEST_NAME)
        for f in files:
            shutil.copyfile(f, staging / f.name)
        (staging / "model-config.yaml").write_text(yaml.safe_dump(model_config(cfg, cpu, cuda), sort_keys=False))
        extra = [str(staging / MANIFEST_NAME), *(str(staging / f.name) for f in files)]
        cmd = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            cfg.run,
            "--version",
            str(manifest["version"]),
            "--handler",
            str(staging / "handler.py"),
            "--extra-files",
            ",".join(extra),
            "--config-file",
            str(staging / "model-config.yaml"),
            "--export-path",
            str(staging),
            "--force",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # its stderr in our error
        if proc.returncode != 0:
            raise RuntimeError(
                f"torch-model-archiver failed ({proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
            )
        os.replace(staging / f"{cfg.run}.mar", cfg.mar_path)  # same filesystem: atomic
    log(
        f"{cfg.run}: wrote {cfg.mar_path} (version {manifest['version']}, cpu {cpu}, cuda {cuda}, "
        f"batch {cfg.batch_size} / {cfg.max_batch_delay_ms} ms, {cfg.max_workers} worker(s) x "
        f"{cfg.threads} thread(s))"
    )
    return cfg.mar_path


def needs_archive(artifact_dir: Path, mar_path: Path) -> bool:
    """True when an export exists and its archive is missing or older than its manifest."""
    manifest = artifact_dir / MANIFEST_NAME
    if not manifest.is_file():
        return False
    return not mar_path.is_file() or mar_path.stat().st_mtime < manifest.stat().st_mtime
