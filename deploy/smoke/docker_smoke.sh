#!/bin/bash
# `make docker-smoke`: build the TorchServe image (deploy/docker/Dockerfile, --target torchserve) with
# podman on a machine with no registry, run it the
# way Kubernetes would (read-only root, tmpfs for /tmp and logs, UID 10001, no capabilities), wait for
# the HEALTHCHECK, post held-out digits to /predictions/digits, check /metrics, then `podman stop` and
# check the shutdown was graceful. Not part of `make test`: the build installs ~5 GB of wheels.
#
# Needs: podman + runc + debootstrap (Debian packages), model_store/digits.mar or SMOKE_MODEL_STORE.
# Everything big goes under SMOKE_DIR (default /var/tmp/visionpipe-smoke), never into the repository.
# SMOKE_NO_BUILD=1 runs the checks on IMAGE as last built.
set -euo pipefail
cd "$(dirname "$0")/../.."

SMOKE_NAME=docker-smoke
IMAGE="${IMAGE:-localhost/visionpipe-serve:smoke}"
PORT="${SMOKE_PORT:-18080}"            # host network: ports away from a `make serve` on 8080-8082
MPORT=$((PORT + 1)) METRICS_PORT=$((PORT + 2)) GRPC_PORT=$((PORT + 3)) GRPC_MPORT=$((PORT + 4))
NAME=visionpipe-smoke
# shellcheck source=deploy/smoke/base_image.sh
. deploy/smoke/base_image.sh
smoke_preflight

# 1. Build the Dockerfile's torchserve target on a debootstrapped Debian bookworm (smoke_build), with
#    the container's config.properties rendered from serving/config.properties (generated, never committed).
"$PY" deploy/container_config.py
smoke_build build.log -f deploy/docker/Dockerfile --target torchserve

# 2. Run as Kubernetes would, on free-ish ports (TS_* overrides the config's addresses), until the
#    image's health check passes.
smoke_run --tmpfs /var/log/torchserve \
    -e TS_INFERENCE_ADDRESS="http://127.0.0.1:$PORT" -e TS_MANAGEMENT_ADDRESS="http://127.0.0.1:$MPORT" \
    -e TS_METRICS_ADDRESS="http://127.0.0.1:$METRICS_PORT" -e TS_MODELS=digits=digits.mar \
    -e TS_GRPC_INFERENCE_PORT="$GRPC_PORT" -e TS_GRPC_MANAGEMENT_PORT="$GRPC_MPORT" \
    "$IMAGE"
smoke_wait_healthy health.txt podman exec "$NAME" python3 /opt/visionpipe/bin/healthcheck.py

# 3. Golden images, then the metrics the ServiceMonitor would scrape.
"$PY" deploy/smoke/predict_check.py --url "http://127.0.0.1:$PORT" --run digits --count 64 | tee "$SMOKE_DIR/predict.txt"
smoke_check_metrics

# 4. Graceful stop: SIGTERM -> drain -> TorchServe stops -> exit 0, well inside the grace period.
smoke_stop container.log
grep -q "entrypoint: TorchServe stopped" "$SMOKE_DIR/container.log" || die "no graceful-stop line in the logs"
say "PASS"
