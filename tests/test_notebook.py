"""notebooks/pipeline.ipynb runs top to bottom, headless, so it cannot rot.

nbclient executes it in a real ipykernel with the project's functions: training on the embedded digits,
the loss curve, filters and feature maps, export, and a real TorchServe it starts on free loopback ports,
posts held-out digits to and stops. The NB_* variables keep it short and write everything under
tmp_path instead of the repository.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "pipeline.ipynb"
RUN = "digits-nb-test"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_notebook_is_committed_without_outputs():
    """Outputs are generated (and can be large or stale): the repository holds the clean notebook."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch):
    from serving.server import running_pid, stop_server

    monkeypatch.setenv("NB_ROOT", str(tmp_path))
    monkeypatch.setenv("NB_RUN", RUN)
    monkeypatch.setenv("NB_MODEL", "simple_cnn")  # ~10x fewer weights than mnist_cnn: seconds, not a minute
    monkeypatch.setenv("NB_EPOCHS", "3")
    monkeypatch.setenv("NB_VARIANTS", "onnx-fp32")
    monkeypatch.setenv("NB_LATENCY_ROUNDS", "0")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # The kernel must be this interpreter (the venv with the project), whatever PATH says.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    workdir = tmp_path / "logs" / "notebook-serve"
    try:
        client.execute()
    finally:
        if running_pid(workdir) is not None:  # the notebook stops its server; this is the safety net
            stop_server(workdir)
            pytest.fail("the notebook left its TorchServe running")

    outputs = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "epoch 3/3" in outputs and "test accuracy" in outputs
    assert (tmp_path / "runs" / RUN / "best.pt").is_file()
    assert (tmp_path / "runs" / RUN / "visualize" / "filters.png").is_file()
    assert list((tmp_path / "runs" / RUN / "visualize").glob("features_*.png"))
    assert (tmp_path / "artifacts" / RUN / "manifest.json").is_file()
    assert (tmp_path / "model_store" / f"{RUN}.mar").is_file()
    # The plots and images really came out: data grid, loss curve, filters, feature maps, predictions.
    pictures = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if "image/png" in o.get("data", {}))
    assert pictures >= 5, pictures
    # The last step's line, built from the server's answers: "<url>/predictions/<run>: k/8 ... right".
    [served] = [line for line in outputs.splitlines() if f"/predictions/{RUN}: " in line]
    correct = int(served.split(": ", 1)[1].split("/", 1)[0])
    assert "held-out digits right" in served and "onnx-fp32 on cpu" in served, served
    assert correct >= 4, served  # 3 epochs on digits: well above chance (1 in 10)
