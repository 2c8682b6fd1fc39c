# Sourced by docker_smoke.sh, oip_smoke.sh and workstation_smoke.sh (which define say, die, SMOKE_DIR,
# BASE_IMAGE): the base image the smoke builds start from, a debootstrapped Debian bookworm with
# python3-venv, imported into podman once; and what the serving images' smokes check and pass first.
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

# The serving images' build arguments, in the arrays build_args and volumes: torch from this machine's
# wheel mirror when there is one (PyPI otherwise), and a TLS-intercepting proxy's CA (the host bundle)
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
