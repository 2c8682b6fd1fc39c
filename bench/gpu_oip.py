"""The Java-free runtime on a GPU, in one call: serve the demo model on cuda:0 through
``python -m serving.oip``, post real images, and search capacity on CUDA vs the CPU.

    make gpu-wheels                                   # here: the runtime's wheels -> .gpu-wheels/
    python3 bench/gpu_oip.py --out DIR [--quick]      # there: one call on the GPU machine

Written for a bare GPU machine: torch and CUDA installed, but neither this project's venv nor Java nor
a package registry. Whatever the runtime and the load generator need and that machine lacks is
installed from the wheels folder (``pip install --no-index --no-deps --target``; torchserve's wheel
there carries only its Python package ``ts``, not its 46 MB Java frontend). Its torch may be older
than the one the model was exported with: an archive whose variant does not load or fails its
reference check there is rebuilt from the checkpoint with that torch (``python -m export``, ``python
-m serving archive``). Without CUDA every step runs on the CPU alone and the report says so; that is
how ``make test`` proves this script from a bare copy of the tree (tests/test_deploy.py).

Steps: 1 dependencies, 2 the model (``<model-store>/<run>.mar`` as built, else re-exported from
``<runs-dir>/<run>/best.pt``), 3 one runtime per device (cuda:0 when CUDA works, and the CPU) on free
loopback ports, 4 answers (held-out images through ``/predictions``, their top-1 against the labels,
the device each answer names, one Open Inference Protocol ``/v2/.../infer``), 5 capacity: the highest
Poisson rate within the SLO (``loadtest.capacity``, measured open loop by ``loadtest.openloop``), both
devices searched in lockstep, 6 SIGTERM: each runtime drains and exits 0. Writes DIR/gpu_oip.json and
DIR/gpu_oip.md (a section for docs/benchmarks.md) and prints the table last. Exit 0 when every
check passed, 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
# What the runtime (the oip extra), the archiver and the open-loop generator import, by the
# distribution that provides it. Only those that fail to import here are installed from the wheels.
NEEDED = (("uvicorn", "uvicorn"), ("h11", "h11"), ("click", "click"), ("httptools", "httptools"),
          ("uvloop", "uvloop"), ("multipart", "python-multipart"), ("grpc", "grpcio"),
          ("google.protobuf", "protobuf"), ("rapidjson", "python-rapidjson"), ("tritonclient.grpc", "tritonclient"),
          ("prometheus_client", "prometheus-client"), ("ts", "torchserve"), ("model_archiver", "torch-model-archiver"),
          ("hdrh", "hdrhistogram"), ("pbr", "pbr"))
# torchserve's wheel minus its Java frontend (ts/frontend/model-server.jar, 46 MB): this runtime never
# starts it, and the GPU machine takes at most 64 MiB of carried files.
TORCHSERVE_DROP = "ts/frontend/"
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux_2_5_x86_64", "manylinux1_x86_64")
# Python versions the wheels are fetched for: the GPU machine's (3.12) and this project's venv (3.11,
# for the CPU proof in make test).
WHEEL_PYTHONS = ("3.12", "3.11")
CARRY_LIMIT_MB = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pinned_versions(lock: Path = LOCK) -> dict[str, str]:
    """``name -> version`` from the project's lock (``make lock``): the one place versions are pinned.
    Its requirement lines start in column 0 (``name==version [; marker] \\``); hashes are indented."""
    out: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if line[:1].isalnum() and "==" in line:
            name, version = line.split(";", 1)[0].split("==", 1)
            out.setdefault(name.strip().lower(), version.strip(" \\"))
    return out


# ---- here: make gpu-wheels ------------------------------------------------------------------------
def strip_wheel(wheel: Path, drop_prefix: str) -> int:
    """Rewrites ``wheel`` without the files under ``drop_prefix`` (and their RECORD lines, so pip
    installs it as a consistent wheel). Returns the bytes saved."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(drop_prefix):
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not line.startswith(drop_prefix.encode()))
            dst.writestr(item, data)
    os.replace(tmp, wheel)
    return before - wheel.stat().st_size


def download_wheels(dest: Path, pythons: tuple[str, ...] = WHEEL_PYTHONS) -> int:
    """The NEEDED distributions at their pinned versions, as manylinux x86-64 wheels for each Python."""
    versions = pinned_versions()
    missing = [d for _, d in NEEDED if d not in versions]
    if missing:
        raise SystemExit(f"error: no pinned version for {missing} in {LOCK}; add them to pyproject.toml, then make lock")
    dest.mkdir(parents=True, exist_ok=True)
    specs = [f"{d}=={versions[d]}" for _, d in NEEDED]
    for py in pythons:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", py,
               "--implementation", "cp", *[a for p in WHEEL_PLATFORMS for a in ("--platform", p)], "-d", str(dest), *specs]
        log(f"pip download for Python {py}: {len(specs)} distributions")
        subprocess.run(cmd, check=True)
    for wheel in dest.glob("torchserve-*.whl"):
        with zipfile.ZipFile(wheel) as z:
            if any(n.startswith(TORCHSERVE_DROP) for n in z.namelist()):
                log(f"{wheel.name}: dropped {TORCHSERVE_DROP} ({strip_wheel(wheel, TORCHSERVE_DROP) / 1e6:.1f} MB)")
    total = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB "
          f"(the GPU machine takes {CARRY_LIMIT_MB} MiB of carried files in all)")
    if total > (CARRY_LIMIT_MB - 16) * 2**20:
        print("warning: leaves under 16 MiB for the checkpoint and archive", file=sys.stderr)
    return 0


# ---- there: 1. dependencies ------------------------------------------------------------------------
def import_failures(env: dict) -> dict[str, str]:
    """``module -> error`` for each NEEDED module that does not import (in a fresh interpreter)."""
    probe = ("import importlib, json, sys\nout = {}\n"
             f"for m in {[m for m, _ in NEEDED]!r}:\n"
             "    try:\n        importlib.import_module(m)\n"
             "    except Exception as e:\n        out[m] = f'{type(e).__name__}: {e}'[:300]\n"
             "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"import probe failed: {done.stderr[-1000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _usable_wheels(wheels: Path) -> set[str]:
    """NEEDED distributions with a wheel in ``wheels`` at the pinned version that this Python can install."""
    versions, py = pinned_versions(), f"cp{sys.version_info.major}{sys.version_info.minor}"
    return {d for _, d in NEEDED
            if any("py3-none" in w.name or "py2.py3-none" in w.name or "abi3" in w.name or f"-{py}-" in w.name
                   for w in wheels.glob(f"{d.replace('-', '_')}-{versions[d]}-*.whl"))}


def _pip_install(dists: list[str], wheels: Path, site: Path) -> None:
    versions = pinned_versions()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), "--find-links", str(wheels),
           *[f"{d}=={versions[d]}" for d in dists]]
    log(f"installing {len(dists)} wheels into {site}: {', '.join(dists)}")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"error: pip install from {wheels} failed: {done.stderr.strip()[-1500:]}")


def ensure_dependencies(wheels: Path | None, site: Path, force: bool) -> dict:
    """Makes every NEEDED module importable, with ``site`` and the repository first on this process's
    and its children's path. From ``wheels`` it installs into ``site``, first the distributions whose
    module does not import (all usable ones with ``force``); when something still fails (one that
    imports but is too old for another: tritonclient's generated code checks grpcio and protobuf), every
    usable one. Returns what was missing, what was installed, and where modules come from."""
    env_path = [str(site), str(REPO)]
    os.environ["PYTHONPATH"] = os.pathsep.join(env_path)
    sys.path[:0] = [p for p in env_path if p not in sys.path]
    failing = import_failures(dict(os.environ))
    report: dict = {"missing_before": failing, "installed": [], "wheels": str(wheels) if wheels else None}
    if failing or force:
        if wheels is None or not wheels.is_dir():
            raise SystemExit(f"error: {sorted(failing)} do not import and no wheels folder was given "
                             f"(--wheels DIR; make gpu-wheels fills .gpu-wheels/ where pip works)")
        usable = _usable_wheels(wheels)
        dists = dict(NEEDED)
        plans = [sorted(usable if force else {dists[m] for m in failing}), sorted(usable)]
        for plan in plans:
            plan = [d for d in plan if d not in report["installed"]]
            if plan:
                _pip_install(plan, wheels, site)
                report["installed"] += plan
            failing = import_failures(dict(os.environ))
            if not failing:
                break
        if failing:
            raise SystemExit(f"error: still not importable after installing the wheels in {wheels}: {failing}")
    import importlib
    importlib.invalidate_caches()
    report["imported_from"] = {m: _origin(m) for m in ("serving", "uvicorn", "ts", "torch")}
    return report


def _origin(module: str) -> str:
    import importlib
    spec = importlib.util.find_spec(module)
    return str(Path(spec.origin).parent) if spec and spec.origin else "?"


# ---- 2. the model ------------------------------------------------------------------------------------
def archive_problem(mar: Path, devices: list[str]) -> str | None:
    """Why ``mar`` cannot be served here as built (a variant that does not load on this torch, or fails
    its reference check on a device), or None. The same load and check the handler does at start-up."""
    import yaml

    from export.runtime import load_checked_variant
    from serving.handler import HandlerConfig

    with tempfile.TemporaryDirectory(prefix="gpu-oip-mar-") as tmp:
        with zipfile.ZipFile(mar) as z:
            z.extractall(tmp)
        config = HandlerConfig.from_yaml(yaml.safe_load((Path(tmp) / "model-config.yaml").read_text()))
        for device in devices:
            variant = config.variant_cuda if device.startswith("cuda") else config.variant_cpu
            try:
                runner = load_checked_variant(tmp, variant, device=device)
            except Exception as e:  # noqa: BLE001 -- any failure means: rebuild with this torch
                return f"{variant or 'default variant'} on {device}: {type(e).__name__}: {str(e)[:300]}"
            log(f"{mar.name}: {runner.variant} on {runner.device} passes its reference check here")
    return None


def prepare_model(run: str, model_store: Path, runs_dir: Path, work: Path, devices: list[str],
                  export_args: list[str]) -> tuple[Path, dict]:
    """(model store to serve ``run`` from, what was done). The archive as built when it serves here,
    else one exported and archived from the checkpoint with this machine's torch."""
    mar = model_store / f"{run}.mar"
    info: dict = {"mar": str(mar)}
    if mar.is_file():
        problem = archive_problem(mar, devices)
        if problem is None:
            info["source"] = f"{mar} as built"
            return model_store, info
        info["as_built_problem"] = problem
        log(f"{mar}: {problem}; re-exporting from the checkpoint")
    checkpoint = runs_dir / run / "best.pt"
    if not checkpoint.is_file():
        raise SystemExit(f"error: no usable {mar} and no {checkpoint}: carry one of them "
                         f"(make demo builds both; --model-store / --runs-dir say where)")
    artifacts, store = work / "artifacts", work / "model_store"
    for cmd in (["-m", "export", "--run", run, "--runs-dir", str(runs_dir), "--out-dir", str(artifacts), *export_args],
                ["-m", "serving", "archive", "--run", run, "--artifacts-dir", str(artifacts), "--model-store", str(store)]):
        t0 = time.monotonic()
        log("$ python " + " ".join(cmd))
        done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"error: python {' '.join(cmd[:2])} failed ({done.returncode}): "
                             f"{(done.stderr or done.stdout)[-2000:]}")
        info[f"{cmd[1]}_s"] = round(time.monotonic() - t0, 1)
    import torch
    info["source"] = f"exported from {checkpoint} with torch {torch.__version__} and archived here"
    return store, info


# ---- 3. the runtimes ---------------------------------------------------------------------------------
@dataclass
class Runtime:
    device: str
    http: str       # base URL
    grpc_port: int
    metrics: str    # base URL
    proc: subprocess.Popen
    log_path: Path
    ready_s: float = 0.0
    exit_code: int | None = None
    stop_s: float = 0.0

    def cpu_s(self) -> float:
        """CPU seconds of the runtime and its worker processes so far."""
        from serving.server import tree_cpu_s

        return tree_cpu_s(self.proc.pid)


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    from serving.httpclient import NoAnswer, request
    try:
        answer = request("GET", url, timeout=timeout)
    except NoAnswer:
        return 0, b""
    return answer.status, answer.body


@contextmanager
def runtime(store: Path, run: str, device: str, work: Path, log_dir: Path, workers: int | None,
            ready_timeout_s: float) -> Iterator[Runtime]:
    """``python -m serving.oip`` for ``run`` on ``device``, on free loopback ports, ready; SIGTERM on exit.
    Its archives are unpacked under ``work``; its log goes to ``log_dir``."""
    from serving.server import free_port

    ports = [free_port() for _ in range(3)]
    log_path = log_dir / f"oip-{device.replace(':', '')}.log"
    cmd = [sys.executable, "-m", "serving.oip", "--model-store", str(store), "--models", run,
           "--http", f"127.0.0.1:{ports[0]}", "--grpc", f"127.0.0.1:{ports[1]}",
           "--metrics", f"127.0.0.1:{ports[2]}", "--device", device.split(":")[0],
           "--workdir", str(work / f"oip-{device.replace(':', '')}"),
           *(["--workers", str(workers)] if workers else [])]
    log("$ python " + " ".join(cmd[1:]))
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    rt = Runtime(device, f"http://127.0.0.1:{ports[0]}", ports[1], f"http://127.0.0.1:{ports[2]}", proc, log_path)
    t0 = time.monotonic()
    try:
        while _get(f"{rt.http}/v2/health/ready", timeout=2)[0] != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"the {device} runtime exited ({proc.returncode}) before it was ready: "
                                   f"{log_path.read_text()[-2000:]}")
            if time.monotonic() - t0 > ready_timeout_s:
                raise RuntimeError(f"the {device} runtime not ready after {ready_timeout_s:.0f} s: "
                                   f"{log_path.read_text()[-2000:]}")
            time.sleep(0.25)
        rt.ready_s = round(time.monotonic() - t0, 1)
        log(f"{device}: ready after {rt.ready_s} s on {rt.http}")
        yield rt
    finally:
        t1 = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        rt.exit_code, rt.stop_s = proc.returncode, round(time.monotonic() - t1, 1)
        log(f"{device}: SIGTERM -> exit {rt.exit_code} in {rt.stop_s} s")


# ---- 4. answers ----------------------------------------------------------------------------------------
def check_answers(rt: Runtime, run: str, images: list[bytes], labels: list[int | None]) -> dict:
    """Held-out images through /predictions (top-1 vs label, the device named), one v2 infer, metadata."""
    from serving.httpclient import request

    correct, devices, statuses = 0, set(), {}
    for image, label in zip(images, labels, strict=False):
        answer = request("POST", f"{rt.http}/predictions/{run}", image, {"Content-Type": "image/png"})
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
        if answer.status == 200:
            doc = json.loads(answer.body)
            devices.add(doc.get("device"))
            first = doc["predictions"][0]
            correct += label is not None and int((first[0] if isinstance(first, list) else first)["index"]) == label
    v2_body = json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                      "data": [base64.b64encode(images[0]).decode()]}]}).encode()
    v2 = request("POST", f"{rt.http}/v2/models/{run}/infer", v2_body, {"Content-Type": "application/json"})
    v2_status = v2.status
    v2_doc = json.loads(v2.body) if v2_status == 200 else {}
    meta_status, _ = _get(f"{rt.http}/v2/models/{run}")
    labelled = sum(label is not None for label in labels)
    out = {"images": len(images), "labelled": labelled, "correct": correct,
           "accuracy": round(correct / labelled, 4) if labelled else None, "statuses": statuses,
           "devices_answered": sorted(d for d in devices if d), "v2_infer_status": v2_status,
           "v2_device": (v2_doc.get("parameters") or {}).get("device"), "v2_metadata_status": meta_status}
    wanted = rt.device.split(":")[0]
    out["ok"] = (statuses == {200: len(images)} and v2_status == 200 and meta_status == 200
                 and bool(devices) and all(str(d).startswith(wanted) for d in devices)
                 and (not labelled or correct / labelled >= 0.5))
    return out


# ---- 5. capacity -----------------------------------------------------------------------------------------
def measure_capacity(runtimes: list[Runtime], run: str, images: list[bytes], a: argparse.Namespace) -> dict:
    """Closed-loop screen per runtime (its ceiling seeds the search), then the open-loop capacity search
    for all runtimes in lockstep, so each sees the same background drift."""
    from loadtest.capacity import SLO, Point, SearchPlan, search_lockstep
    from loadtest.openloop import Target, run_closed_loop, run_open_loop

    slo = SLO() if a.slo_p99_ms is None else SLO(p99_ms=a.slo_p99_ms)
    targets = {rt.device: Target.post(f"{rt.http}/predictions/{run}", images, {"Content-Type": "image/png"})
               for rt in runtimes}
    by_device = {rt.device: rt for rt in runtimes}
    screens = {}
    for device, target in targets.items():
        run_closed_loop(target, 16, a.warm_s, warmup_s=0.0)  # first batches: allocator, kernels, graph plans
        screens[device] = run_closed_loop(target, 16, a.screen_s, warmup_s=0.5).achieved_rps
        log(f"{device}: closed loop (16 connections) {screens[device]:.0f} req/s")

    def measure(device: str):
        def at(rate: float) -> Point:
            rt, t0 = by_device[device], time.monotonic()
            cpu0 = rt.cpu_s()
            r = run_open_loop(targets[device], rate, a.duration_s, a.warmup_s)
            server_cpu = 100 * (rt.cpu_s() - cpu0) / (time.monotonic() - t0)
            p = Point(r.offered_rps, r.achieved_rps, r.p50_ms, r.p99_ms, r.errors,
                      {"generator_cpu": round(r.generator_cpu), "send_lag_p99_ms": round(r.send_lag_p99_ms, 2),
                       "server_cpu": round(server_cpu)})
            verdict = "pass" if slo.passes(p) else "FAIL: " + "; ".join(slo.violations(p))
            log(f"  {device:6s} offered {r.offered_rps:7.0f}  achieved {r.achieved_rps:7.0f}  p50 {r.p50_ms:6.1f}  "
                f"p99 {r.p99_ms:7.1f} ms  errors {r.errors}  gen CPU {r.generator_cpu:3.0f}%  server CPU "
                f"{server_cpu:4.0f}%  {verdict}")
            return p
        return at

    searches = search_lockstep({d: (measure(d), max(1.0, 0.7 * screens[d])) for d in targets},
                               SearchPlan(slo, max_points=a.max_points))
    out = {"slo": asdict(slo), "screens_rps": {d: round(v) for d, v in screens.items()}, "devices": {}}
    for device, s in searches.items():
        c = s.capacity
        out["devices"][device] = {
            "capacity_rps": round(s.capacity_rps), "p50_ms": c and round(c.p50_ms, 2), "p99_ms": c and round(c.p99_ms, 2),
            "achieved_rps": c and round(c.achieved_rps), "errors": c and c.errors, **((c and c.extra) or {}),
            "points": [{"offered_rps": round(p.offered_rps), "achieved_rps": round(p.achieved_rps),
                        "p99_ms": round(p.p99_ms, 2), "errors": p.errors, "passes": slo.passes(p), **(p.extra or {})}
                       for p in s.points]}
    return out


# ---- the report --------------------------------------------------------------------------------------------
def machine_facts(cuda: bool) -> dict:
    import torch

    from training.machine import cpu_name
    facts = {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "cuda_available": cuda}
    if cuda:
        facts["gpu"] = torch.cuda.get_device_name(0)
        smi = shutil.which("nvidia-smi")
        if smi:
            facts["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total",
                                                  "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    try:
        import onnxruntime
        facts["onnxruntime"] = f"{onnxruntime.__version__} {onnxruntime.get_available_providers()}"
    except ImportError:
        pass
    return facts


def render(doc: dict) -> str:
    m, cap = doc["machine"], doc.get("capacity", {})
    gpu = m.get("nvidia_smi") or m.get("gpu") or "none: CUDA not available, CPU only"
    lines = [f"## Java-free runtime on GPU ({doc['started']}, `{doc['command']}`)", "",
             f"- machine: GPU {gpu}; CPU {m['cpu']}; torch {m['torch']} (CUDA {m['cuda']}), Python {m['python']}, "
             f"onnxruntime {m.get('onnxruntime', '?')}",
             f"- dependencies: installed from wheels: {', '.join(doc['deps']['installed']) or 'none needed'}",
             f"- model: {doc['model']['source']}" + (f" (as built: {doc['model']['as_built_problem']})"
                                                      if doc["model"].get("as_built_problem") else ""), ""]
    if not m["cuda_available"]:
        lines += ["**CUDA was not available: the CPU runtime alone was served and searched.**", ""]
    lines += ["| device | ready s | golden top-1 | answered on | v2 infer | capacity req/s (p99 <= "
              f"{cap.get('slo', {}).get('p99_ms', '?')} ms) | p50 ms | p99 ms | closed loop req/s | server CPU % | "
              "generator CPU % | SIGTERM exit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for device, r in doc["runtimes"].items():
        c = {k: ("-" if v is None else v) for k, v in cap.get("devices", {}).get(device, {}).items()}
        ans = r.get("answers", {})
        lines.append(f"| {device} | {r.get('ready_s')} | {ans.get('correct')}/{ans.get('labelled')} | "
                     f"{', '.join(ans.get('devices_answered', []))} | {ans.get('v2_infer_status')} | "
                     f"{c.get('capacity_rps', '-')} | {c.get('p50_ms', '-')} | {c.get('p99_ms', '-')} | "
                     f"{cap.get('screens_rps', {}).get(device, '-')} | {c.get('server_cpu', '-')} | "
                     f"{c.get('generator_cpu', '-')} | {r.get('exit_code')} in {r.get('stop_s')} s |")
    lines += ["", "Capacity: the highest Poisson rate with p99 (from the intended send time) within the SLO, no "
              "errors and >= 98 % answered (`loadtest.capacity`, open loop); devices searched in lockstep. "
              "The generator is one asyncio process on the same machine: where its CPU is near 100 % the "
              "number is the generator's ceiling, a lower bound for the server.", "",
              f"Result: **{'PASS' if doc['ok'] else 'FAIL'}**" + (f" ({'; '.join(doc['problems'])})" if doc["problems"] else "")]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/gpu_oip.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("wheels", help="download the wheels the GPU machine needs (here, where pip works)")
    w.add_argument("--dir", type=Path, default=REPO / ".gpu-wheels", help="where they go (git-ignored)")
    w.add_argument("--python", action="append", help=f"Python versions (default: {' '.join(WHEEL_PYTHONS)})")
    c = sub.add_parser("check", help="the GPU check (the default command)")
    c.add_argument("--out", type=Path, required=True, help="writes gpu_oip.json, gpu_oip.md and the runtimes' logs here")
    c.add_argument("--run", default="digits", help="the model, by run name")
    c.add_argument("--model-store", type=Path, default=REPO / "model_store", help="where <run>.mar may be")
    c.add_argument("--runs-dir", type=Path, default=REPO / "runs", help="where <run>/best.pt may be")
    c.add_argument("--wheels", type=Path, default=REPO / ".gpu-wheels", help="wheels for what does not import here")
    c.add_argument("--force-wheels", action="store_true", help="install every wheel usable here, even what imports")
    c.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda:0 and the CPU when CUDA works, else the CPU alone; cuda: fail without it")
    c.add_argument("--workers", type=int, help="worker processes per runtime (default: the runtime's)")
    c.add_argument("--images", type=int, default=128, help="held-out images posted for the answer check and the load")
    c.add_argument("--slo-p99-ms", type=float, help="default: the serving SLO (serving/metrics.py)")
    c.add_argument("--duration-s", type=float, default=5.0, help="measured seconds per capacity point")
    c.add_argument("--warmup-s", type=float, default=1.0)
    c.add_argument("--screen-s", type=float, default=4.0, help="closed-loop screen per device")
    c.add_argument("--warm-s", type=float, default=3.0, help="closed-loop warm-up per device before the screen")
    c.add_argument("--max-points", type=int, default=8, help="capacity points per device")
    c.add_argument("--quick", action="store_true", help="short everything (the CPU proof in make test)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("wheels", "check", "-h", "--help"):
        argv = ["check", *argv]
    a = p.parse_args(argv)
    if a.cmd == "check" and a.quick:
        a.images, a.duration_s, a.warmup_s, a.screen_s, a.warm_s, a.max_points = 32, 1.5, 0.5, 1.5, 1.0, 3
        a.workers = a.workers or 1  # one worker process starts in half the time on two shared cores
    return a


def check(a: argparse.Namespace, command: str) -> int:
    t_start = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    doc: dict = {"started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
                 "problems": []}
    work = Path(tempfile.mkdtemp(prefix="gpu-oip-"))
    doc["deps"] = ensure_dependencies(a.wheels if a.wheels.is_dir() else None, work / "site", a.force_wheels)

    import torch
    cuda = a.device != "cpu" and torch.cuda.is_available()
    if a.device == "cuda" and not cuda:
        print(f"error: --device cuda: torch {torch.__version__} sees no CUDA device here", file=sys.stderr)
        return 1
    devices = (["cuda:0"] if cuda else []) + ["cpu"]
    doc["machine"] = machine_facts(cuda)
    log(f"devices: {devices} (torch {torch.__version__}, CUDA {'available' if cuda else 'NOT available'})")
    # quick: one CPU variant and small gates (a minute less on two cores); else every variant.
    export_args = (["--variants", "onnx-fp32", "--check-size", "64", "--eval-size", "128", "--latency-rounds", "1"]
                   if a.quick else [])
    store, doc["model"] = prepare_model(a.run, a.model_store, a.runs_dir, work, devices, export_args)

    from loadtest.images import load_pool
    pool = load_pool(a.run, limit=a.images, artifacts_dir=work / "artifacts", runs_dir=a.runs_dir)
    images, labels = list(pool.images), list(pool.labels)
    doc["images"] = pool.source
    doc["runtimes"] = {}
    with ExitStack() as stack:
        running = []
        for device in devices:
            try:
                rt = stack.enter_context(runtime(store, a.run, device, work, a.out, a.workers, ready_timeout_s=240))
            except RuntimeError as e:
                doc["problems"].append(str(e)[:500])
                doc["runtimes"][device] = {"error": str(e)[-2000:]}
                continue
            running.append(rt)
            answers = check_answers(rt, a.run, images, labels)
            doc["runtimes"][device] = {"ready_s": rt.ready_s, "answers": answers}
            log(f"{device}: answers {answers}")
            if not answers["ok"]:
                doc["problems"].append(f"{device}: answers wrong: {answers}")
        if running:
            doc["capacity"] = measure_capacity(running, a.run, images, a)
    for rt in running:
        doc["runtimes"][rt.device].update(exit_code=rt.exit_code, stop_s=rt.stop_s)
        if rt.exit_code != 0:
            doc["problems"].append(f"{rt.device}: exit {rt.exit_code} after SIGTERM (want 0: drained)")
    doc["ok"] = not doc["problems"] and len(running) == len(devices)
    doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
    shutil.rmtree(work, ignore_errors=True)
    from training.files import atomic_write_text
    atomic_write_text(a.out / "gpu_oip.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(a.out / "gpu_oip.md", render(doc))
    print(render(doc))
    print(f"gpu_oip: {'PASS' if doc['ok'] else 'FAIL'} in {doc['elapsed_s']} s; wrote {a.out / 'gpu_oip.json'}")
    return 0 if doc["ok"] else 1


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.cmd == "wheels":
        return download_wheels(a.dir, tuple(a.python or WHEEL_PYTHONS))
    return check(a, "python bench/gpu_oip.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
