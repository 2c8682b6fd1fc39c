"""The container's TorchServe config: make serve's ``serving/config.properties`` with the few settings a
container needs changed (``overrides``), rendered by ``serving.server.render_config``.

    python deploy/container_config.py      # write deploy/config/config.properties

The rendered file is what the image copies (deploy/docker/Dockerfile), what kustomize turns into the
``torchserve-config`` ConfigMap (deploy/config/kustomization.yaml) and what the KServe layout holds. It
is generated, never committed: make renders it before ``docker-build``, ``docker-smoke``,
``k8s-validate`` and ``k8s-deploy`` (``make container-config`` alone), the tests before they read it.
Every other setting (limits, queue size, security settings) is the base's, so the two cannot drift.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: import the project's renderer

from serving.server import DEFAULT_CONFIG, read_properties, render_config  # noqa: E402

OUT = REPO / "deploy" / "config" / "config.properties"
# Where the image puts its files (deploy/docker/Dockerfile: COPY ... /opt/visionpipe/config/).
IMAGE_CONFIG_DIR = "/opt/visionpipe/config"
IMAGE_MODEL_STORE = "/opt/visionpipe/model-store"


def overrides(base: dict[str, str]) -> dict[str, str]:
    """The settings the container changes in ``base`` (the local config's properties), each with why."""
    return {
        # Inference and metrics reachable from outside the container, on the base's ports; management
        # stays on loopback as in the base: it can scale workers, and the HEALTHCHECK and the entrypoint
        # run inside the container. In Kubernetes a NetworkPolicy admits only inference clients to the
        # one and Prometheus to the other (deploy/k8s/base/networkpolicy.yaml).
        **{key: base[key].replace("://127.0.0.1:", "://0.0.0.0:") for key in ("inference_address", "metrics_address")},
        # The only URL TorchServe may fetch: a .mar already in the image's model store (the base's
        # comment says why; make serve puts its own store's path here the same way).
        "allowed_urls": f"file://{IMAGE_MODEL_STORE}/[A-Za-z0-9_.-]+[.]mar",
        # KServe's TorchServe runtime starts without --models: every archive in the store is loaded.
        "load_models": "all",
        # Only for archives without a model-config.yaml (ours set their workers); more capacity comes
        # from replicas (HPA), not from workers competing for the pod's CPU limit.
        "default_workers_per_model": "1",
        # The image's copies of the files the base names relative to the repository.
        "metrics_config": f"{IMAGE_CONFIG_DIR}/metrics.yaml",
        # The Java heap follows the container's memory limit instead of a fixed size; exit (and be
        # restarted) on OOM instead of limping on. Logging as make serve's (serving/log4j2.xml).
        "vmargs": f"-XX:MaxRAMPercentage=40.0 -XX:+ExitOnOutOfMemoryError "
                  f"-Dlog4j.configurationFile={IMAGE_CONFIG_DIR}/log4j2.xml",
    }


def render(out: str | os.PathLike = OUT, base: str | os.PathLike = DEFAULT_CONFIG) -> dict[str, str]:
    """Write the container's config to ``out``; returns its properties. The base is named relative
    to the working directory in the file's first line (make runs from the repository root), so that
    the file, and the ConfigMap's hash, do not depend on where the clone lives."""
    return render_config(os.path.relpath(base), out, overrides(read_properties(base)))


if __name__ == "__main__":
    print(f"wrote {os.path.relpath(OUT)} ({len(render())} settings)")
