#!/bin/bash
# `make docker-smoke`: build the serving image with podman on a machine with no registry, run it the
# way Kubernetes would (read-only root, tmpfs for /tmp and logs, UID 10001, no capabilities), wait for
# the HEALTHCHECK, post held-out digits to /predictions/digits, check /metrics, then `podman stop` and
# check the shutdown was graceful. Not part of `make test`: the build installs ~5 GB of wheels.
#
# Needs: podman + runc + debootstrap (Debian packages), model_store/digits.mar or SMOKE_MODEL_STORE.
# Everything big goes under SMOKE_DIR (default /var/tmp/visionpipe-smoke), never into the repository.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY="${PY:-.venv/bin/python}"
SMOKE_DIR="${SMOKE_DIR:-/var/tmp/visionpipe-smoke}"
SMOKE_MODEL_STORE="${SMOKE_MODEL_STORE:-$PWD/model_store}"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian-bookworm:smoke}"
IMAGE="${IMAGE:-localhost/visionpipe-serve:smoke}"
PORT="${SMOKE_PORT:-18080}"            # host network: ports away from a `make serve` on 8080-8082
MPORT=$((PORT + 1)) METRICS_PORT=$((PORT + 2)) GRPC_PORT=$((PORT + 3)) GRPC_MPORT=$((PORT + 4))
NAME=visionpipe-smoke
# runc, cgroupfs, host network, no default ulimits: see deploy/smoke/containers.conf.
export CONTAINERS_CONF="$PWD/deploy/smoke/containers.conf"

say() { echo "docker-smoke: $*"; }
die() { echo "docker-smoke: error: $*" >&2; exit 1; }

# shellcheck source=deploy/smoke/base_image.sh
. "$(dirname "$0")/base_image.sh"
smoke_preflight

# 1. Base image: a debootstrapped Debian bookworm with python3-venv, imported once.
ensure_base_image

# 2. Build (smoke_build_args: torch's wheel source and the proxy CA), with the container's config.properties
#    rendered from serving/config.properties (generated, never committed).
"$PY" deploy/container_config.py
smoke_build_args
say "building $IMAGE (log: $SMOKE_DIR/build.log)"
start=$(date +%s)
podman build --format docker --network host -f deploy/docker/Dockerfile --target torchserve "${build_args[@]}" "${volumes[@]}" \
    -t "$IMAGE" . >"$SMOKE_DIR/build.log" 2>&1 || { tail -20 "$SMOKE_DIR/build.log"; die "build failed"; }
say "built in $(( $(date +%s) - start )) s; size $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"

# 3. Run as Kubernetes would, on free-ish ports (TS_* overrides the config's addresses).
podman rm -f "$NAME" >/dev/null 2>&1 || true
trap 'podman rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
podman run -d --name "$NAME" --network host --read-only --tmpfs /tmp --tmpfs /var/log/torchserve \
    --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges \
    -v "$SMOKE_MODEL_STORE:/opt/visionpipe/model-store:ro" \
    -e TS_INFERENCE_ADDRESS="http://127.0.0.1:$PORT" -e TS_MANAGEMENT_ADDRESS="http://127.0.0.1:$MPORT" \
    -e TS_METRICS_ADDRESS="http://127.0.0.1:$METRICS_PORT" -e TS_MODELS=digits=digits.mar \
    -e TS_GRPC_INFERENCE_PORT="$GRPC_PORT" -e TS_GRPC_MANAGEMENT_PORT="$GRPC_MPORT" \
    "$IMAGE" >/dev/null
start=$(date +%s)
until podman exec "$NAME" python3 /opt/visionpipe/bin/healthcheck.py >"$SMOKE_DIR/health.txt" 2>&1; do
    if [ "$(podman inspect "$NAME" --format '{{.State.Running}}')" != "true" ]; then
        podman logs "$NAME" 2>&1 | tail -30; die "container exited before becoming healthy"
    fi
    [ $(( $(date +%s) - start )) -lt 300 ] || { podman logs "$NAME" 2>&1 | tail -30; die "not healthy after 300 s: $(cat "$SMOKE_DIR/health.txt")"; }
    sleep 3
done
say "healthy after $(( $(date +%s) - start )) s: $(cat "$SMOKE_DIR/health.txt")"

# 4. Golden images, then the metrics the ServiceMonitor would scrape.
"$PY" deploy/smoke/predict_check.py --url "http://127.0.0.1:$PORT" --run digits --count 64 | tee "$SMOKE_DIR/predict.txt"
metrics=$(curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | grep -c '^ts_inference_requests_total' || true)
[ "$metrics" -gt 0 ] || die "no ts_inference_requests_total on :$METRICS_PORT/metrics"
say "metrics: ts_inference_requests_total exported ($metrics series)"

# 5. Graceful stop: SIGTERM -> drain -> TorchServe stops -> exit 0, well inside the grace period.
start=$(date +%s)
podman stop -t 45 "$NAME" >/dev/null
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
podman logs "$NAME" >"$SMOKE_DIR/container.log" 2>&1
grep -q "entrypoint: TorchServe stopped" "$SMOKE_DIR/container.log" || die "no graceful-stop line in the logs (exit $code)"
[ "$code" = "0" ] || die "container exit code $code after SIGTERM"
say "stopped gracefully in $(( $(date +%s) - start )) s (exit 0)"
say "PASS"
