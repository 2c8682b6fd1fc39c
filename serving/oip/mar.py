"""``<store>/<name>.mar`` -> an unpacked model directory and its settings (``ModelSpec``).

A .mar is a zip with ``MAR-INF/MANIFEST.json`` (model name, handler, config file) beside the files
the archiver packed; ``model-config.yaml`` holds TorchServe's batching and worker keys and the
handler's own section. Both are read here, once, into a frozen ``ModelSpec`` the workers share.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

# TorchServe's own defaults for the keys an archive may leave out (its ConfigManager / model-config).
DEFAULT_BATCH_SIZE, DEFAULT_BATCH_DELAY_MS, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S = 1, 100, 100, 120


@dataclass(frozen=True)
class ModelSpec:
    """One served model, as its archive describes it.

    Attributes:
        name: the name it is served under (the archive's file stem, as ``make serve`` registers it).
        model_dir: where the archive was unpacked; the handler's ``model_dir``.
        handler: the manifest's handler entry (``handler.py`` or ``module:function``).
        version: the manifest's model version.
        batch_size, max_batch_delay_ms: dynamic batching (model-config.yaml batchSize, maxBatchDelay).
        job_queue_size: requests waiting for this model before new ones are answered 503 at once.
        response_timeout_s: a batch that takes longer is logged as a stuck handler.
        max_workers: TorchServe's worker count for this model (the runtime's process count default).
        yaml_config: the whole model-config.yaml (the handler reads its own section).
    """

    name: str
    model_dir: Path
    handler: str
    version: str
    batch_size: int
    max_batch_delay_ms: int
    job_queue_size: int
    response_timeout_s: int
    max_workers: int
    yaml_config: dict

    def to_json(self) -> dict:
        return {**self.__dict__, "model_dir": str(self.model_dir)}

    @classmethod
    def from_json(cls, doc: dict) -> ModelSpec:
        return cls(**{**doc, "model_dir": Path(doc["model_dir"])})


class ArchiveError(ValueError):
    """An archive that cannot be served: missing, not a zip, no manifest, unsafe paths."""


def unpack(mar: Path, dest: Path) -> Path:
    """Extract ``mar`` into ``dest`` (replaced); refuses members that would land outside it."""
    if not mar.is_file():
        raise ArchiveError(f"{mar} does not exist; build it with `make archive RUN={mar.stem}`")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        with zipfile.ZipFile(mar) as z:
            for member in z.namelist():
                target = (dest / member).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise ArchiveError(f"{mar}: member {member!r} would be written outside {dest}")
            z.extractall(dest)
    except zipfile.BadZipFile as e:
        raise ArchiveError(f"{mar} is not a model archive ({e}); rebuild it: make archive RUN={mar.stem}") from e
    return dest


def read_spec(name: str, model_dir: Path) -> ModelSpec:
    """The ModelSpec of an unpacked archive."""
    manifest_path = model_dir / "MAR-INF" / "MANIFEST.json"
    if not manifest_path.is_file():
        raise ArchiveError(f"{model_dir}: no MAR-INF/MANIFEST.json; not a TorchServe model archive")
    model = json.loads(manifest_path.read_text()).get("model", {})
    if not model.get("handler"):
        raise ArchiveError(f"{manifest_path}: names no handler")
    config_file = model.get("configFile")
    config = (yaml.safe_load((model_dir / config_file).read_text()) or {}) if config_file else {}
    return ModelSpec(
        name=name,
        model_dir=model_dir,
        handler=model["handler"],
        version=str(model.get("modelVersion", "1.0")),
        batch_size=int(config.get("batchSize", DEFAULT_BATCH_SIZE)),
        max_batch_delay_ms=int(config.get("maxBatchDelay", DEFAULT_BATCH_DELAY_MS)),
        job_queue_size=int(config.get("jobQueueSize", DEFAULT_QUEUE)),
        response_timeout_s=int(config.get("responseTimeout", DEFAULT_TIMEOUT_S)),
        max_workers=int(config.get("maxWorkers", 1)),
        yaml_config=config,
    )


def open_archives(store: Path, names: list[str], workdir: Path) -> list[ModelSpec]:
    """Unpack ``<store>/<name>.mar`` for each name under ``<workdir>/models/`` and read its spec."""
    return [read_spec(n, unpack(store / f"{n}.mar", workdir / "models" / n)) for n in names]
