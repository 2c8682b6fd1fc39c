# Sourced by docker_smoke.sh and workstation_smoke.sh (which define say, die, SMOKE_DIR, BASE_IMAGE):
# the base image both smoke builds start from, a debootstrapped Debian bookworm with python3-venv,
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
