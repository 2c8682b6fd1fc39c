"""Every shell command in README.md and docs/*.md runs as written, offline, on a fresh checkout after
``make demo`` -- or is listed in NOT_RUN with the reason it cannot run here.

The commands are the lines of the ```bash / ```sh / ```shell blocks (a command continues over ``\\``,
``|`` and unclosed quotes or braces; ``VAR=$(...)`` joins the command after it). They run in document
order (README.md, then docs/ by name), each in a fresh bash with ``.venv/bin`` first on PATH (the
README's ``source .venv/bin/activate``), in a copy of the checkout inside a private network namespace:
no network at all (so "offline" is checked, not assumed) and the documented fixed ports
(127.0.0.1:8080-8082) cannot meet another server. The runner starts ``make serve`` before a command
that talks to a server when none runs (``make serve TOKEN=1`` for the token recipes) and stops it
before a command that starts its own. Each must exit 0 without a Python traceback.

Three deviations, all through make variables: ``make demo`` trains 2 epochs instead of 15 (the steps
after training run as written), ``make loadtest`` runs 10 s instead of 60 (``DURATION``) and its
latency gates are out of reach (``P95_MS``/``P99_MS``: latency on a shared machine is no test; its error
gate stays). On a shared 2-core AMD EPYC (load average 6-8): 9 min 20 s, 200 s of them ``make demo``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = ("bash", "sh", "shell")

# Commands not run here: (pattern matched at the start of the command, the reason). Every pattern must
# match a documented command (test_not_run_list_is_current), so the list cannot go stale.
NOT_RUN: list[tuple[str, str]] = [
    (r"make test\b", "the test suite itself"),
    (r"make train( *$| *#| RUN=(mnist|cifarnet|r9) )", "downloads CIFAR-10 / MNIST (network)"),
    (r"(make train RUN=fashion|python -m training train --run fashion) .*/usr/share/datasets",
     "needs Debian's dataset-fashion-mnist (apt, network)"),
    (r"python -m training train --run digits --model mnist_cnn --dataset digits --epochs 15 --min-steps 0",
     "make demo's training step (make demo runs it)"),
    (r"make export *(#|$)", "exports the served runs cifarnet and mnist, trained on downloaded data"),
    (r"make archive RUN=cifarnet", "needs the cifarnet export (CIFAR-10, network)"),
    (r"make (export RUN=digits|demo-serve)\b", ("what make demo already ran (its export, samples, "
                                               "reliability and serve steps): another minute for nothing new")),
    (r"python -m export --run digits", "a second export of what make demo exported (about a minute)"),
    (r"make (bench-train|bench-sweep|bench-export|bench-serve|bench-hostile|capacity|soak)\b",
     "a benchmark: minutes to tens of minutes of full load (docs/benchmarks.md has its results)"),
    (r"make loadtest USERS=32 DURATION=5m", "a five-minute load test"),
    ((r"(\.venv/bin/)?python (bench/|-m training train --run (digits(-mnistcnn)?|fashion|cifarnet) .*--runs-dir "
     r"(/tmp|reports/pipeline))"), ("a benchmark's recipe: trains and exports into /tmp (minutes), some on "
                                  "downloaded data")),
    (r"\.venv/bin/python -(c|m export) ", "a benchmark's recipe (exports into /tmp, minutes)"),
    (r"python -m (export|serving archive) --run RUN", "a template (RUN, [--data-dir ...] are placeholders)"),
    (r"make (docker-build|docker-smoke|workstation-smoke)\b|docker run\b", ("builds or runs a container "
                                                                          "image (docker/podman, ~5 GB)")),
    (r"make k8s-(deploy|smoke)\b", "needs a Kubernetes cluster"),
    (r"make k8s-validate\b", "run by tests/test_deploy.py (the same checks, offline)"),
    (r"apt-get install\b", "installs system packages (root, network)"),
    (r"curl -X POST -T samples/digits/7.png http://127.0.0.1:8080", ("posts to the container started "
                                                                   "by the docker run above")),
]


def fenced_commands(path: Path) -> list[tuple[str, str | None]]:
    """The shell commands of ``path``'s bash/sh/shell fences, in order (comment-only lines dropped), each
    with the ``make serve ...`` command an earlier line of its block starts its server with (None: any
    server will do): the curl lines under ``make serve RUNTIME=oip`` need that runtime."""
    commands: list[tuple[str, str | None]] = []
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", path.read_text(), re.DOTALL | re.MULTILINE):
        if block.group(1) not in SHELL_FENCES:
            continue
        pending, server = "", None
        for line in block.group(2).splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending = f"{pending}\n{line}" if pending else line
            if _complete(pending):
                commands.append((pending, server))
                if re.match(r"make serve\b(?!.*&&)", pending):
                    server = _uncommented(pending)
                pending = ""
        assert not pending, f"{path.name}: unfinished command at the end of a block: {pending!r}"
    joined: list[tuple[str, str | None]] = []  # TOKEN=$(...) belongs to the command that uses it
    for cmd, server in commands:
        if joined and re.fullmatch(r"[A-Z_]+=\$\(.*\)", joined[-1][0], re.DOTALL):
            joined[-1] = (joined[-1][0] + "\n" + cmd, server)
        else:
            joined.append((cmd, server))
    return joined


def _uncommented(cmd: str) -> str:
    """``cmd`` without its trailing ``# comments``, on one line."""
    return " ".join(" ".join(re.sub(r"\s+#[^'\"]*$", "", line) for line in cmd.splitlines()).split())


def _complete(text: str) -> bool:
    """Whether ``text`` is a whole command: bash parses it, and it does not end in a pipe or ``\\``."""
    if text.rstrip().endswith(("\\", "|", "&&")):
        return False
    return subprocess.run(["bash", "-n", "-c", text], check=False, capture_output=True).returncode == 0


def documented_commands() -> list[tuple[str, str, str | None]]:
    """(document name, command, the server it needs) for every command of README.md and docs/*.md, first
    occurrence only (the same command documented twice, with other comments, runs once)."""
    seen, out = set(), []
    for path in DOCS:
        for cmd, server in fenced_commands(path):
            key = _uncommented(cmd)
            if key not in seen:
                seen.add(key)
                out.append((str(path.relative_to(REPO)), cmd, server))
    return out


def not_run_reason(cmd: str) -> str | None:
    for pattern, reason in NOT_RUN:
        if re.match(pattern, cmd.strip(), re.DOTALL):
            return reason
    return None


def test_extraction_finds_the_documented_commands():
    cmds = [c for _, c, _ in documented_commands()]
    assert cmds[0].startswith("make demo"), cmds[:2]
    assert any("--data-binary @-" in c and "base64" in c for c in cmds), "the streamed base64 recipe"
    assert all(not c.lstrip().startswith("#") for c in cmds)


def test_not_run_list_is_current():
    cmds = [c for _, c, _ in documented_commands()]
    unused = [p for p, _ in NOT_RUN if not any(re.match(p, c.strip(), re.DOTALL) for c in cmds)]
    assert not unused, f"NOT_RUN patterns that match no documented command (remove them): {unused}"


# ---- running them -------------------------------------------------------------------------------
TALKS_TO_SERVER = re.compile(r"127\.0\.0\.1:808\d|serving\.client (predict|demo)|^make loadtest")
STARTS_SERVER = re.compile(r"^make (serve|demo|demo-serve)\b")


def _sandbox(dest: Path) -> Path:
    """A copy of the checkout's files (tracked and new, not ignored: a fresh clone with this tree's
    edits) with mtimes kept, so make sees .venv's stamps as up to date, and .venv linked in."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(REPO / ".venv")
    return dest


def run_plan(root: Path, plan: list[dict]) -> list[dict]:
    """Run ``plan`` (each {"doc", "cmd"}) in ``root``, starting and stopping the server around them as
    the module docstring says; returns one result per command and per helper step."""
    # DURATION, P95_MS, P99_MS: make loadtest for 10 s instead of 60, with its latency gates out of reach
    # (latency on a shared machine is no test); its error gate stays.
    env = {**os.environ, "PATH": f"{root / '.venv' / 'bin'}:{os.environ['PATH']}", "DURATION": "10s",
           "P95_MS": "60000", "P99_MS": "60000", "PYTHONPATH": str(root)}
    env.pop("VIRTUAL_ENV", None)
    results: list[dict] = []

    def sh(cmd: str, doc: str, timeout: float = 900) -> dict:
        t0 = time.monotonic()
        try:
            p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=root, env=env, capture_output=True,
                               text=True, timeout=timeout, check=False)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = 124, f"timed out after {timeout} s: {e.output or ''}{e.stderr or ''}"
        # curl exits 0 on an error answer too: a JSON error body (TorchServe's {"code": 4xx/5xx, ...},
        # the handler's and the v2 {"error": ...}) counts as a failure
        error_answer = cmd.lstrip("{ ").startswith(("curl", "printf")) and bool(
            re.search(r'"code":\s*[45]\d\d|^\{"error"', out, re.MULTILINE))
        r = {"doc": doc, "cmd": cmd, "rc": rc or (22 if error_answer else 0),
             "seconds": round(time.monotonic() - t0, 1),
             "traceback": "Traceback (most recent call last)" in out, "tail": out[-1500:]}
        results.append(r)
        return r

    def running() -> bool:
        return subprocess.run([str(root / ".venv/bin/python"), "-m", "serving.client", "idle"], cwd=root,
                              env=env, capture_output=True, check=False).returncode != 0

    current = None  # the `make serve ...` command the running server was started with
    for step in plan:
        cmd = step["cmd"]
        if STARTS_SERVER.match(cmd):
            if running():
                sh("make stop", "(runner)")
            sh(cmd, step["doc"])
            current = _uncommented(cmd) if running() else None
            continue
        if TALKS_TO_SERVER.search(cmd):
            wants_token = "key_file.json" in cmd or "$TOKEN" in cmd
            desired = step.get("server") or ("make serve TOKEN=1" if wants_token else "make serve")
            # a command whose block starts no server takes the running one, unless tokens differ
            any_will_do = step.get("server") is None and current is not None and \
                wants_token == ("TOKEN=1" in current)
            if not running() or (current != desired and not any_will_do):
                if running():
                    sh("make stop", "(runner)")
                sh(desired, "(runner)")
                current = desired
        sh(cmd, step["doc"])
    if running():
        sh("make stop", "(runner)")
    return results


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_documented_commands_run_offline(tmp_path):
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) for a private network namespace")
    probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, text=True,
                           check=False)
    if probe.returncode != 0:
        pytest.skip(f"no private network namespace here (unshare -rn: {probe.stderr.strip()})")
    root = _sandbox(tmp_path / "checkout")
    plan = []
    for doc, cmd, server in documented_commands():
        if not_run_reason(cmd) is None:
            if cmd.strip() == "make demo" or cmd.startswith("make demo "):
                cmd = cmd.replace("make demo", "make demo DEMO_TRAIN_ARGS='--run digits --model mnist_cnn "
                                               "--dataset digits --epochs 2 --min-steps 0'", 1)
            plan.append({"doc": doc, "cmd": cmd, "server": server})
    assert plan[0]["cmd"].startswith("make demo")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = subprocess.run(["unshare", "-rn", "bash", "-c", "ip link set lo up && exec \"$0\" \"$1\" run \"$2\" \"$3\"",
                          sys.executable, __file__, str(root), str(tmp_path / "plan.json")],
                         capture_output=True, text=True, timeout=1750, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "plan.json.results").read_text())
    table = "\n".join(f"{r['rc']:>3} {r['seconds']:6.1f}s  {r['doc']:18s} {' '.join(r['cmd'].split())[:110]}"
                      for r in results)
    print(table)
    failed = [r for r in results if r["rc"] != 0 or r["traceback"]]
    assert not failed, "documented commands that failed:\n" + "\n\n".join(
        f"[{r['doc']}] {r['cmd']}\n  exit {r['rc']}{' with a traceback' if r['traceback'] else ''}:\n{r['tail']}"
        for r in failed) + "\n\nall:\n" + table
    ran = {r["cmd"] for r in results}
    assert all(step["cmd"] in ran for step in plan)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "run":
    # inside the network namespace: python tests/test_docs_commands.py run ROOT PLAN
    plan_path = Path(sys.argv[3])
    results = run_plan(Path(sys.argv[2]), json.loads(plan_path.read_text()))
    (plan_path.parent / (plan_path.name + ".results")).write_text(json.dumps(results))


def test_make_help_lists_every_target():
    """make help is generated from the `## text` after each target: every .PHONY target the README or
    docs/ name (`make TARGET`) has one; a target without one is an internal step (check-...)."""
    phony = set()
    for mk in [REPO / "Makefile", *sorted((REPO / "mk").glob("*.mk"))]:
        for line in mk.read_text().splitlines():
            if line.startswith(".PHONY:"):
                phony.update(line.split(":", 1)[1].split())
    out = subprocess.run(["make", "-s", "--no-print-directory", "help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("  make ")}
    documented = {t for path in DOCS for t in re.findall(r"\bmake ([a-z][\w-]*)", path.read_text())} & phony
    missing = documented - listed
    assert not missing, f"documented targets without a `## text` (make help omits them): {sorted(missing)}"
    assert not listed - phony, f"listed but not .PHONY: {sorted(listed - phony)}"
