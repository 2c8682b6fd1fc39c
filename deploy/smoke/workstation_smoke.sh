#!/bin/bash
# `make workstation-smoke`: build the workstation image with podman (as docker_smoke.sh builds the
# serving image: a debootstrapped Debian base, runc, host network), run it as `make workstation` does
# (read-only root, tmpfs /tmp, no capabilities, the image's non-root user, volumes for /workspace,
# runs/, data/, artifacts/ and the home), and check, from outside:
#   1. Jupyter: a request without the token (or with a wrong one) is refused, one with it is served;
#   2. SSH: the mounted key logs in as the workstation user; a password, root, and an unknown key are
#      refused; no process in the container runs as root; the root filesystem is read-only;
#   3. inside, over SSH, as that user: a tiny `make train`, then tests/test_notebook.py (the notebook
#      top to bottom: train, export, a real TorchServe, predictions);
#   4. a new container on the same volumes (now with a mounted token file) still has the runs, data,
#      artifacts and home files, the same SSH host key, and takes the mounted token.
# Not part of `make test`: the build installs ~5 GB of wheels. Needs podman, runc, debootstrap, curl and
# an ssh client. Everything goes under SMOKE_DIR (default /var/tmp/visionpipe-ws-smoke).
# SMOKE_NO_BUILD=1 (or SMOKE_SKIP_BUILD=1) runs the checks on IMAGE as it is; SMOKE_RUN_ARGS adds
# `podman run` arguments.
set -euo pipefail
cd "$(dirname "$0")/../.."

SMOKE_NAME=workstation-smoke
SMOKE_DIR="${SMOKE_DIR:-/var/tmp/visionpipe-ws-smoke}"
SMOKE_NO_BUILD="${SMOKE_NO_BUILD:-${SMOKE_SKIP_BUILD:-}}"
IMAGE="${IMAGE:-localhost/visionpipe-workstation:smoke}"
JPORT="${SMOKE_JUPYTER_PORT:-18888}"   # host network: away from a `make workstation` on 8888/2222
SPORT="${SMOKE_SSH_PORT:-12222}"
NAME=visionpipe-ws-smoke
WS_UID=10001
# shellcheck source=deploy/smoke/base_image.sh
. deploy/smoke/base_image.sh

trap 'echo "workstation-smoke: error: line $LINENO failed: $BASH_COMMAND" >&2' ERR
# The container's own log lines, then stop: used when a check fails.
fail() { podman logs "$NAME" 2>&1 | tail -25 >&2 || true; die "$*"; }

command -v podman >/dev/null || die "podman not found: apt-get install podman runc debootstrap"
command -v ssh >/dev/null || die "ssh not found: apt-get install openssh-client"
mkdir -p "$SMOKE_DIR"

# ---- 1. base image and build (smoke_build, as the serving images' smokes) ------------------------------
smoke_build build.log -f deploy/docker/workstation/Dockerfile --build-arg WS_UID=$WS_UID --build-arg WS_GID=$WS_UID

# ---- 2. volumes, keys, run ---------------------------------------------------------------------------
VOL="$SMOKE_DIR/volumes"
rm -rf "$VOL" "$SMOKE_DIR/keys"
mkdir -p "$VOL"/{workspace,runs,data,artifacts,home} "$SMOKE_DIR/keys"
chown -R $WS_UID:$WS_UID "$VOL"                   # what `make workstation` gets by building with your uid
ssh-keygen -q -t ed25519 -N "" -C smoke -f "$SMOKE_DIR/keys/id_smoke"
ssh-keygen -q -t ed25519 -N "" -C stranger -f "$SMOKE_DIR/keys/id_stranger"
cp "$SMOKE_DIR/keys/id_smoke.pub" "$SMOKE_DIR/keys/authorized_keys"
openssl rand -hex 24 >"$SMOKE_DIR/keys/jupyter_token" 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(24))' >"$SMOKE_DIR/keys/jupyter_token"
chmod 644 "$SMOKE_DIR/keys/authorized_keys" "$SMOKE_DIR/keys/jupyter_token"

cleanup() { podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
start_container() {  # $@: extra podman run arguments
    cleanup
    podman run -d --name "$NAME" --network host --read-only --tmpfs /tmp:rw,exec,nosuid,nodev,size=4g \
        --cap-drop ALL --security-opt no-new-privileges \
        -e JUPYTER_IP=127.0.0.1 -e JUPYTER_PORT="$JPORT" -e SSH_PORT="$SPORT" \
        -v "$VOL/workspace:/workspace" -v "$VOL/runs:/workspace/runs" -v "$VOL/data:/workspace/data" \
        -v "$VOL/artifacts:/workspace/artifacts" -v "$VOL/home:/home/dev" \
        -v "$SMOKE_DIR/keys/authorized_keys:/etc/visionpipe/ssh/authorized_keys:ro" ${SMOKE_RUN_ARGS:-} "$@" \
        "$IMAGE" >/dev/null
    local t0; t0=$(date +%s)
    until podman logs "$NAME" 2>&1 | grep -q '^workstation: Jupyter Lab' \
          && [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$JPORT/api")" = 200 ]; do
        [ "$(podman inspect "$NAME" --format '{{.State.Running}}')" = true ] || fail "container exited"
        [ $(( $(date +%s) - t0 )) -lt 120 ] || fail "Jupyter not up after 120 s"
        sleep 1
    done
    say "Jupyter up after $(( $(date +%s) - t0 )) s"
}
status() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
SSH=(ssh -p "$SPORT" -o UserKnownHostsFile="$SMOKE_DIR/keys/known_hosts" -o StrictHostKeyChecking=accept-new
     -o BatchMode=yes -o ConnectTimeout=10 -o IdentitiesOnly=yes)
as_dev() { "${SSH[@]}" -i "$SMOKE_DIR/keys/id_smoke" dev@127.0.0.1 "$@"; }
refused() {  # $1: what; rest: ssh arguments. Passes when ssh fails with "Permission denied".
    local what=$1; shift
    if out=$("${SSH[@]}" "$@" true 2>&1); then fail "SSH accepted $what"; fi
    grep -q "Permission denied" <<<"$out" || fail "SSH $what: expected 'Permission denied', got: $out"
    say "SSH refuses $what: $(grep -o 'Permission denied.*' <<<"$out")"
}

rm -f "$SMOKE_DIR/keys/known_hosts"
for port in "$JPORT" "$SPORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is taken (host network): set SMOKE_JUPYTER_PORT / SMOKE_SSH_PORT"; fi
done
start_container
podman logs "$NAME" 2>&1 | { grep '^workstation' || true; } | sed 's/token [0-9a-f]\{16,\}/token <printed>/; s/^/    /'
TOKEN=$(podman logs "$NAME" 2>&1 | sed -n 's/^workstation: Jupyter Lab: port [0-9]*, token \([0-9a-f]*\) .*/\1/p')
[ -n "$TOKEN" ] || fail "no generated token in the log"
[ "$(podman logs "$NAME" 2>&1 | grep -c "$TOKEN")" = 1 ] || fail "the token appears more than once in the log"
say "a new token was generated and printed once (${#TOKEN} hex characters)"

# ---- 3. Jupyter: token required ---------------------------------------------------------------------
API="http://127.0.0.1:$JPORT/api/contents"
[ "$(status "$API")" = 403 ] || fail "GET /api/contents without a token: $(status "$API"), expected 403"
[ "$(status -H "Authorization: token wrong-$TOKEN" "$API")" = 403 ] || fail "a wrong token was accepted"
[ "$(status -H "Authorization: token $TOKEN" "$API")" = 200 ] || fail "the token was refused"
[ "$(status "http://127.0.0.1:$JPORT/lab")" = 302 ] || fail "/lab without a token did not redirect to the login"
kernel=$(curl -sf -X POST -H "Authorization: token $TOKEN" "http://127.0.0.1:$JPORT/api/kernels" -d '{"name":"python3"}')
say "Jupyter: no token 403, wrong token 403, token 200, /lab -> login 302; kernel started with the token: $(sed 's/.*"name": *"\([^"]*\)".*/\1/' <<<"$kernel")"

# ---- 4. SSH: key only, never root; nothing runs as root; read-only root ------------------------------
who=$(as_dev 'echo "$(id -un) $(id -u)"') || fail "SSH with the mounted key failed"
[ "$who" = "dev $WS_UID" ] || fail "SSH logged in as '$who', expected 'dev $WS_UID'"
say "SSH: the mounted key logs in as $who"
refused "a password" -o PubkeyAuthentication=no -o PreferredAuthentications=password,keyboard-interactive dev@127.0.0.1
refused "root (with the mounted key)" -i "$SMOKE_DIR/keys/id_smoke" root@127.0.0.1
refused "an unknown key" -i "$SMOKE_DIR/keys/id_stranger" dev@127.0.0.1
root_procs=$(as_dev 'ps -eo uid=,comm= | awk "\$1 == 0"')
[ -z "$root_procs" ] || fail "processes running as root: $root_procs"
say "processes: $(as_dev 'ps -eo user=,comm= | sort -u | tr -s " " | paste -sd, -') (none as root)"
if as_dev 'touch /opt/visionpipe/x' 2>/dev/null; then fail "the root filesystem is writable"; fi
say "root filesystem read-only (touch /opt/visionpipe/x refused)"

# ---- 5. inside, as the workstation user: make train, the notebook test ------------------------------
start=$(date +%s)
as_dev 'cd /workspace && make train RUN=digits DATASET=digits EPOCHS=1' >"$SMOKE_DIR/train.log" 2>&1 \
    || { tail -20 "$SMOKE_DIR/train.log"; fail "make train inside failed"; }
[ -f "$VOL/runs/digits/best.pt" ] || fail "make train wrote no runs/digits/best.pt on the runs volume"
say "make train RUN=digits DATASET=digits EPOCHS=1 inside: $(( $(date +%s) - start )) s; $(grep '^best epoch' "$SMOKE_DIR/train.log")"
start=$(date +%s)
as_dev 'cd /workspace && python -m pytest -q -p no:cacheprovider tests/test_notebook.py' >"$SMOKE_DIR/pytest.log" 2>&1 \
    || { tail -30 "$SMOKE_DIR/pytest.log"; fail "tests/test_notebook.py inside failed"; }
say "tests/test_notebook.py inside: $(tail -1 "$SMOKE_DIR/pytest.log") ($(( $(date +%s) - start )) s)"

# ---- 6. restart: a new container on the same volumes -------------------------------------------------
as_dev 'echo data > /workspace/data/smoke.txt && echo artifacts > /workspace/artifacts/smoke.txt && echo home > ~/smoke.txt'
host_key=$(ssh-keygen -F "[127.0.0.1]:$SPORT" -f "$SMOKE_DIR/keys/known_hosts" | tail -1)
start=$(date +%s)
podman stop -t 20 "$NAME" >/dev/null
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
podman logs "$NAME" 2>&1 | grep -q '^workstation: stopped' || fail "no 'stopped' line after SIGTERM"
say "stopped in $(( $(date +%s) - start )) s (exit 0)"
start_container -v "$SMOKE_DIR/keys/jupyter_token:/etc/visionpipe/jupyter/token:ro"
# known_hosts still holds the first container's key: StrictHostKeyChecking fails if the host key changed.
[ "$(as_dev 'cat /workspace/data/smoke.txt /workspace/artifacts/smoke.txt ~/smoke.txt' | paste -sd' ')" = "data artifacts home" ] \
    || fail "files on the data/artifacts/home volumes did not survive the restart"
as_dev 'test -f /workspace/runs/digits/best.pt && test -f /workspace/notebooks/pipeline.ipynb' || fail "runs/ or the workspace did not survive"
[ "$(ssh-keygen -F "[127.0.0.1]:$SPORT" -f "$SMOKE_DIR/keys/known_hosts" | tail -1)" = "$host_key" ] || fail "the SSH host key changed"
say "after the restart: runs/digits/best.pt, data/, artifacts/, home and the workspace are there; same SSH host key"
FIXED=$(cat "$SMOKE_DIR/keys/jupyter_token")
[ "$(status -H "Authorization: token $FIXED" "$API")" = 200 ] || fail "the mounted token was refused"
[ "$(status -H "Authorization: token $TOKEN" "$API")" = 403 ] || fail "the old generated token still works"
if podman logs "$NAME" 2>&1 | grep -q "$FIXED"; then fail "the mounted token was printed in the log"; fi
say "mounted token: accepted, the previous one refused, not printed in the log"
say "PASS"
