# Sourced, after `cd` to the repository root, by docker_smoke.sh, oip_smoke.sh and workstation_smoke.sh,
# which set SMOKE_NAME (their name in messages), IMAGE and NAME (the container) first: what the three
# smokes share. The settings below keep a value the caller or the environment gave.
PY="${PY:-.venv/bin/python}"
SMOKE_DIR="${SMOKE_DIR:-/var/tmp/visionpipe-smoke}"   # everything big goes here, never into the repository
SMOKE_MODEL_STORE="${SMOKE_MODEL_STORE:-$PWD/model_store}"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian-bookworm:smoke}"
# runc, cgroupfs, host network, no default ulimits: see deploy/smoke/containers.conf.
export CONTAINERS_CONF="$PWD/deploy/smoke/containers.conf"

say() { echo "$SMOKE_NAME: $*"; }
die() { echo "$SMOKE_NAME: error: $*" >&2; exit 1; }

# The base image the smoke builds start from: a debootstrapped Debian bookworm with python3-venv,
# imported into podman once.
ensure_base_image() {
    podman image exists "$BASE_IMAGE" && return 0
    command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"
    say "debootstrap bookworm into $SMOKE_DIR/rootfs"
    rm -rf "$SMOKE_DIR/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
        "$SMOKE_DIR/rootfs" http://deb.debian.org/debian >"$SMOKE_DIR/debootstrap.log" 2>&1
    tar -C "$SMOKE_DIR/rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
}

# podman and the archive the serving smokes post to (SMOKE_MODEL_STORE/digits.mar); SMOKE_DIR made.
smoke_preflight() {
    command -v podman >/dev/null || die "podman not found: apt-get install podman runc debootstrap"
    ls "$SMOKE_MODEL_STORE"/digits.mar >/dev/null 2>&1 \
        || die "no $SMOKE_MODEL_STORE/digits.mar: make train RUN=digits DATASET=digits && make export RUN=digits && make archive RUN=digits (or set SMOKE_MODEL_STORE)"
    mkdir -p "$SMOKE_DIR"
}

# The images' build arguments, in the arrays build_args and volumes: torch from this machine's wheel
# mirror when there is one (PyPI otherwise), and a TLS-intercepting proxy's CA (the host bundle)
# handed to pip.
smoke_build_args() {
    build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg VARIANT=cpu)
    volumes=()
    if [ -d /opt/pypi-more/simple ]; then
        build_args+=(--build-arg TORCH_INDEX_URL=file:///opt/pypi-more/simple)
        volumes+=(-v /opt/pypi-more:/opt/pypi-more:ro)
    fi
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        build_args+=(--build-arg PIP_CERT=/etc/ssl/certs/host-ca.crt)
        volumes+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/host-ca.crt:ro)
    fi
}

# smoke_build LOG PODMAN_BUILD_ARGS...: the base image, then IMAGE built from the repository root with
# smoke_build_args and the given arguments (-f, --target, more --build-arg), logged to SMOKE_DIR/LOG.
# SMOKE_NO_BUILD=1 checks IMAGE as last built instead. --format docker: podman's default OCI image
# format drops HEALTHCHECK and SHELL.
smoke_build() {
    local log="$SMOKE_DIR/$1" start
    shift
    if [ -n "${SMOKE_NO_BUILD:-}" ]; then
        podman image exists "$IMAGE" || die "SMOKE_NO_BUILD: no image $IMAGE; run without it once"
        say "SMOKE_NO_BUILD: using $IMAGE as it is"
    else
        ensure_base_image
        smoke_build_args
        say "building $IMAGE (log: $log)"
        start=$(date +%s)
        podman build --format docker --network host "${build_args[@]}" "${volumes[@]}" "$@" -t "$IMAGE" . \
            >"$log" 2>&1 || { tail -20 "$log"; die "build failed"; }
        say "built in $(( $(date +%s) - start )) s"
    fi
    say "image $IMAGE: $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"
}

# smoke_run PODMAN_RUN_ARGS... IMAGE [ARGS...]: starts the container NAME (replacing one left over)
# the way Kubernetes runs the serving images: read-only root, tmpfs /tmp, UID 10001, no capabilities,
# the model store mounted read-only. Removed when the script exits.
smoke_run() {
    podman rm -f "$NAME" >/dev/null 2>&1 || true
    trap 'podman rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
    podman run -d --name "$NAME" --network host --read-only --tmpfs /tmp \
        --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges \
        -v "$SMOKE_MODEL_STORE:/opt/visionpipe/model-store:ro" "$@" >/dev/null
}

# smoke_wait_healthy OUT CHECK...: runs CHECK (output to SMOKE_DIR/OUT) until it passes; fails with the
# container's log when the container exits or 300 s pass first.
smoke_wait_healthy() {
    local out="$SMOKE_DIR/$1" start
    shift
    start=$(date +%s)
    until "$@" >"$out" 2>&1; do
        if [ "$(podman inspect "$NAME" --format '{{.State.Running}}')" != "true" ]; then
            podman logs "$NAME" 2>&1 | tail -30; die "container exited before becoming healthy"
        fi
        [ $(( $(date +%s) - start )) -lt 300 ] || { podman logs "$NAME" 2>&1 | tail -30; die "not healthy after 300 s: $(cat "$out")"; }
        sleep 2
    done
    say "healthy after $(( $(date +%s) - start )) s: $(tr '\n' ' ' <"$out")"
}

# The metrics the ServiceMonitor would scrape: the runtimes export the same names (METRICS_PORT).
smoke_check_metrics() {
    local metrics
    metrics=$(curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | grep -c '^ts_inference_requests_total' || true)
    [ "$metrics" -gt 0 ] || die "no ts_inference_requests_total on :$METRICS_PORT/metrics"
    say "metrics: ts_inference_requests_total exported ($metrics series)"
}

# smoke_stop LOG: graceful stop: SIGTERM -> drain -> exit 0, well inside the 45 s grace period (podman
# kills it after that); the container's log kept in SMOKE_DIR/LOG.
smoke_stop() {
    local log="$SMOKE_DIR/$1" start code took
    start=$(date +%s)
    podman stop -t 45 "$NAME" >/dev/null
    code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
    podman logs "$NAME" >"$log" 2>&1
    [ "$code" = "0" ] || { tail -20 "$log"; die "container exit code $code after SIGTERM"; }
    took=$(( $(date +%s) - start ))
    [ "$took" -lt 45 ] || die "stop took $took s: SIGTERM was not honoured, podman killed it"
    say "stopped gracefully in $took s (exit 0)"
}
