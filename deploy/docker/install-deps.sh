#!/bin/bash
# install-deps.sh EXTRA: the images' dependency step (deploy/docker/Dockerfile, both runtimes, and
# deploy/docker/workstation/Dockerfile): a venv at /opt/venv with the dependencies of the project's
# EXTRA (serve, oip, workstation) at the lock's versions, and not the project itself: the images
# install it on top (--no-deps) once its code is copied, so this layer (gigabytes with CUDA) is rebuilt
# only when pyproject.toml or requirements.lock change, not on every code or README edit.
#
# Run in the builder's /src, which holds pyproject.toml and requirements.lock. The build's arguments
# reach it as the environment: VARIANT (cpu: torch from TORCH_INDEX_URL, torch's CPU-only index by
# default; cuda: onnxruntime-gpu instead of onnxruntime), TORCH_INDEX_URL (empty: PyPI only, whose
# Linux torch wheels bundle the CUDA runtime), PIP_CERT (a proxy's CA bundle; pip reads it itself).
# VENV: where the venv goes (/opt/venv, where the images want it; tests/test_deploy.py moves it).
set -euo pipefail

extra=${1:-}
[ -n "$extra" ] && [ $# = 1 ] || { echo "usage: install-deps.sh EXTRA (serve, oip or workstation), got: $*" >&2; exit 2; }
case "${VARIANT:-}" in
    cpu|cuda) ;;
    *) echo "VARIANT must be cpu or cuda, got '${VARIANT:-}': pass --build-arg VARIANT=cpu or cuda" >&2; exit 1 ;;
esac

venv=${VENV:-/opt/venv}
python3 -m venv "$venv"
# The lock's versions as pins without its hashes: an image takes only its extra's part of the lock,
# and the CPU variant's torch is another file (2.14.1+cpu) than the one hashed.
sed -n '/^[^ #]/s/ *\\$//p' requirements.lock >pins.txt
# CUDA: onnxruntime-gpu instead of onnxruntime, at the lock's onnxruntime version.
ort=$(sed -n 's/^onnxruntime==\([^ ]*\).*/\1/p' pins.txt)
[ "$VARIANT" = cpu ] || [ -n "$ort" ] || { echo "no onnxruntime==VERSION in requirements.lock: make lock" >&2; exit 1; }
# The project as pyproject.toml alone: setuptools wants the readme and the package folders to exist,
# empty here (the code comes later), in a folder of its own so that /src receives only the real code.
project=$(mktemp -d)
cp pyproject.toml "$project/"
touch "$project/README.md"
mkdir "$project"/{training,export,serving,loadtest}
index=()
[ -z "${TORCH_INDEX_URL:-}" ] || index=(--extra-index-url "$TORCH_INDEX_URL")
"$venv/bin/pip" install -c pins.txt "${index[@]}" "$project[$extra]"
rm -r "$project"
if [ "$VARIANT" = cuda ]; then
    "$venv/bin/pip" uninstall -y onnxruntime
    "$venv/bin/pip" install -c pins.txt "onnxruntime-gpu==$ort"
fi
