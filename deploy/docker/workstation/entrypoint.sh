#!/bin/bash
# PID 1 of the workstation image: Jupyter Lab (token login) and sshd (mounted keys only), both as the
# workstation user. If either exits, the other is stopped and the container exits with an error, so a
# restart policy (or the kubelet) brings both back; SIGTERM stops both and exits 0.
#
#   Jupyter token   the file $JUPYTER_TOKEN_FILE (default /etc/visionpipe/jupyter/token) when it is
#                   mounted; otherwise a new random one, printed once here (and never by Jupyter,
#                   which shows a provided token as "...").
#   SSH             on when /etc/visionpipe/ssh/authorized_keys is mounted (public keys, one a line);
#                   off otherwise, with a note. Host key: generated once into the home volume.
#   /workspace      if empty (a fresh volume: nothing but the volume mount points), filled with a copy of the project (notebooks, Makefile,
#                   sources) so the notebook and `make train` work there; a mounted checkout is left alone.
set -euo pipefail

JUPYTER_IP="${JUPYTER_IP:-0.0.0.0}"       # inside the container; the run command decides who reaches it
JUPYTER_PORT="${JUPYTER_PORT:-8888}"
SSH_PORT="${SSH_PORT:-2222}"             # both ports inside the container (or on a host network)
JUPYTER_TOKEN_FILE="${JUPYTER_TOKEN_FILE:-/etc/visionpipe/jupyter/token}"
AUTHORIZED_KEYS=/etc/visionpipe/ssh/authorized_keys   # fixed: sshd_config's AuthorizedKeysCommand reads it
HOST_KEY_DIR="$HOME/.workstation/ssh"                 # sshd_config's HostKey points here
WORKSPACE=/workspace
SEED=/opt/visionpipe/workspace-seed

say() { echo "workstation: $*"; }

if [ "$(id -u)" = 0 ]; then
    echo "workstation: refusing to run as root; start the container with its default user (or --user 10001)" >&2
    exit 2
fi
mkdir -p "$MPLCONFIGDIR" "$HOME/.workstation"

# ---- /workspace --------------------------------------------------------------------------------
# "Empty" ignores the mount points of the runs/, data/, artifacts/ volumes (the runtime creates them)
# and a fresh filesystem's lost+found.
if [ -z "$(ls -A "$WORKSPACE" 2>/dev/null | grep -vxE 'runs|data|artifacts|lost\+found')" ] && [ -d "$SEED" ]; then
    # -a keeps the files' times: pyproject.toml stays older than the image's venv (mk/workstation.mk).
    cp -a "$SEED/." "$WORKSPACE/"
    say "empty $WORKSPACE: copied the project into it (notebooks/pipeline.ipynb, Makefile, sources)"
fi
for d in runs data artifacts; do mkdir -p "$WORKSPACE/$d" 2>/dev/null || true; done
if ! [ -w "$WORKSPACE" ]; then
    say "warning: $WORKSPACE is not writable by uid $(id -u); mount a folder that uid owns" \
        "(make workstation builds the image with your uid)" >&2
fi

# ---- Jupyter token -------------------------------------------------------------------------------
if [ -f "$JUPYTER_TOKEN_FILE" ]; then
    JUPYTER_TOKEN="$(tr -d '[:space:]' < "$JUPYTER_TOKEN_FILE")"
    [ ${#JUPYTER_TOKEN} -ge 16 ] || { echo "workstation: $JUPYTER_TOKEN_FILE holds fewer than 16 characters; use e.g. \`openssl rand -hex 24\`" >&2; exit 2; }
    token_note="the token in $JUPYTER_TOKEN_FILE"
else
    JUPYTER_TOKEN="$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
    token_note="token $JUPYTER_TOKEN (new at every start; mount a file at $JUPYTER_TOKEN_FILE to fix one)"
fi

# ---- sshd ----------------------------------------------------------------------------------------
sshd_pid=""
if [ -s "$AUTHORIZED_KEYS" ]; then
    mkdir -p "$HOST_KEY_DIR" && chmod 700 "$HOME/.workstation" "$HOST_KEY_DIR"
    if [ ! -f "$HOST_KEY_DIR/ssh_host_ed25519_key" ]; then
        ssh-keygen -q -t ed25519 -N "" -C "visionpipe-workstation" -f "$HOST_KEY_DIR/ssh_host_ed25519_key"
    fi
    chmod 600 "$HOST_KEY_DIR/ssh_host_ed25519_key"  # a volume's group-ownership change may have opened it
    # sshd gives sessions a bare environment: hand them the image's (names only here; values from ENV).
    setenv=()
    for name in PATH PYTHONPATH VENV VISIONPIPE_WORKSTATION VARIANT MPLCONFIGDIR; do
        [ -n "${!name:-}" ] && setenv+=("$name=${!name}")
    done
    /usr/sbin/sshd -D -e -f /opt/visionpipe/config/sshd_config -p "$SSH_PORT" -o "SetEnv=${setenv[*]}" &
    sshd_pid=$!
    say "SSH: port $SSH_PORT, user $(id -un), keys from $AUTHORIZED_KEYS ($(grep -c '^[a-z]' "$AUTHORIZED_KEYS") key(s));" \
        "host key $(ssh-keygen -l -f "$HOST_KEY_DIR/ssh_host_ed25519_key.pub" | cut -d' ' -f2)"
else
    say "SSH: off (no public keys mounted at $AUTHORIZED_KEYS)"
fi

# ---- Jupyter Lab ---------------------------------------------------------------------------------
# The token reaches Jupyter through its environment only (not the command line, which `ps` shows).
JUPYTER_TOKEN="$JUPYTER_TOKEN" jupyter lab --no-browser --ServerApp.ip="$JUPYTER_IP" \
    --ServerApp.port="$JUPYTER_PORT" --ServerApp.port_retries=0 --ServerApp.root_dir="$WORKSPACE" \
    --PasswordIdentityProvider.allow_password_change=False &
jupyter_pid=$!
say "Jupyter Lab: port $JUPYTER_PORT, $token_note"
say "  browser: http://127.0.0.1:$JUPYTER_PORT/lab (the host port the run command published), paste the token"
unset JUPYTER_TOKEN token_note

stopping=0
on_term() {
    stopping=1
    say "stopping"
    kill -TERM $jupyter_pid $sshd_pid 2>/dev/null || true
}
trap on_term TERM INT

# Return when the first service exits (or a trapped signal arrives), then stop the other one.
status=0
wait -n $jupyter_pid $sshd_pid || status=$?
kill -TERM $jupyter_pid $sshd_pid 2>/dev/null || true
wait $jupyter_pid $sshd_pid 2>/dev/null || true
if [ "$stopping" -eq 1 ]; then
    say "stopped"
    exit 0
fi
echo "workstation: a service exited on its own (status $status); stopping the container" >&2
exit 1
