"""The mistakes a new user makes first each end in one line naming the problem and the fix, with a
non-zero exit status and no traceback: unknown model, device, dataset, a non-numeric flag, a run name
taken by another dataset, no server, a refused or missing file, a server already running."""

from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str, cwd: Path = REPO, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


def _one_line(out: subprocess.CompletedProcess, *must_say: str) -> str:
    """The one error line of a failed command (stderr), after the checks every case shares."""
    assert out.returncode != 0, f"exit 0 for a user error; stdout: {out.stdout[-500:]}"
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and len(lines) == 1, f"expected one line on stderr, got:\n{out.stderr}"
    for word in must_say:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    return errors[0]


PY = sys.executable


@pytest.mark.parametrize("args, says", [
    (["--model", "nope"], ["--model 'nope'", "mnist_cnn"]),
    (["--dataset", "nope"], ["--dataset 'nope'", "digits"]),
    (["--device", "nope"], ["--device 'nope'", "cpu"]),
    (["--epochs", "abc"], ["--epochs", "'abc'", "--help"]),
    (["--lr", "fast"], ["--lr", "'fast'"]),
    (["--optimizer", "lion"], ["--optimizer 'lion'", "adamw"]),
])
def test_train_flag_mistakes(args, says, tmp_path):
    _one_line(_run(PY, "-m", "training", "train", "--runs-dir", str(tmp_path), *args), *says)


def test_train_refuses_a_run_of_another_dataset(tmp_path):
    """runs/<RUN> trained on MNIST is not replaced by a digits run (the served name would change model)."""
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "config.json").write_text(json.dumps({"dataset": "mnist", "model": "mnist_cnn"}))
    line = _one_line(_run(PY, "-m", "training", "train", "--run", "digits", "--dataset", "digits",
                          "--runs-dir", str(tmp_path), "--epochs", "1"), "mnist", "--overwrite")
    assert f"mv {tmp_path / 'digits'} {tmp_path / 'mnist'}" in line
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["config.json"]  # nothing written


def test_evaluate_and_visualize_missing_checkpoint(tmp_path):
    for cmd in ("evaluate", "visualize"):
        _one_line(_run(PY, "-m", "training", cmd, "--checkpoint", str(tmp_path / "best.pt")),
                  "does not exist", "make train")


def test_export_tools_name_the_missing_export(tmp_path):
    for module in ("export.samples", "export.reliability"):
        _one_line(_run(PY, "-m", module, "--run", "nope", "--artifacts-dir", str(tmp_path)),
                  "manifest.json", "make export RUN=nope")


def test_client_without_server(tmp_path):
    png = tmp_path / "x.png"
    from PIL import Image
    Image.new("L", (28, 28)).save(png)
    url = f"http://127.0.0.1:{_free_port()}"
    _one_line(_run(PY, "-m", "serving.client", "predict", "--url", url, str(png)), "no server", "make serve")
    _one_line(_run(PY, "-m", "serving.client", "predict", "--url", url, str(tmp_path / "missing.png")),
              "missing.png")
    _one_line(_run(PY, "-m", "serving.client", "predict", "--count", "many"), "--count", "'many'")


@pytest.mark.slow
def test_loadtest_without_server():
    """make loadtest with nothing listening: one line, before any load (locust would print ~50 lines of
    urllib/gevent traceback)."""
    host = f"http://127.0.0.1:{_free_port()}"
    out = _run(PY, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "--host", host,
               "--management-url", host, "--run-time", "2s", "--only-summary", "--loglevel", "WARNING")
    _one_line(out, "no server answers", "make serve")


def test_busy_reason_names_a_running_server_and_a_taken_port(tmp_path):
    """make demo asks this (serving.client idle) before its minute of work."""
    from serving.client import busy_reason
    from serving.server import PID_FILE

    free = {k: _free_port() for k in ("inference", "management")}
    config = tmp_path / "config.properties"
    config.write_text(f"inference_address=http://127.0.0.1:{free['inference']}\n"
                      f"management_address=http://127.0.0.1:{free['management']}\n")
    assert busy_reason(tmp_path / "logs", config) is None
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / PID_FILE).write_text(str(os.getpgid(0)))  # a live process group: ours
    assert "is running" in busy_reason(tmp_path / "logs", config)
    (tmp_path / "logs" / PID_FILE).unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", free["inference"]))
        s.listen()
        assert f"127.0.0.1:{free['inference']}" in busy_reason(tmp_path / "logs", config)


@pytest.mark.parametrize("var", ["MODEL=nope", "EPOCHS=abc"])
def test_make_train_mistakes(var, tmp_path):
    """Through make: the recipe's error line, then make's own "Error 2" line; no usage block, no traceback."""
    out = _run("make", "-s", "--no-print-directory", "train", "RUN=h26-user-error", var,
               f"ARGS=--runs-dir {tmp_path}", timeout=600)
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
    # make's own "Error 2" line: "make: ***", or "make[1]: ***" when make test runs this inside make
    lines = [line for line in out.stderr.splitlines() if line.strip() and not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert len(lines) == 1 and "error:" in lines[0], out.stderr
