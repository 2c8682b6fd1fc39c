# ---- capacity, open loop, with the peers (bench/bench_capacity.py, loadtest/openloop.py) ---------
# make capacity        ours (TorchServe and oip runtimes) vs the stock-style handler at its best setting vs NVIDIA Triton, plus the
#                      no-op ceilings and in-process core bounds (~10 min idle); reports/capacity.json, docs
# make capacity-demo   the open-loop generator vs a closed loop on a server that stalls 200 ms a second
CAPACITY_RUN  ?=
CAPACITY_ARGS ?=
# Triton is a bench-only peer in its own virtualenv, made with Debian's python3.11: the wheel's
# Python-backend stub embeds the system libpython3.11 (shared/notes/serving-peers.md). The wheel is
# installed without its dependencies (only its tritonserver binary and backend are used), plus
# numpy<2: the backend's pybind11 reads numpy 1.x arrays only (with numpy 2 the stub crashes in
# deserialize_bytes_tensor). The model's other packages come from $(VENV) (loadtest/triton_peer.py).
TRITON_PYTHON ?= /usr/bin/python3.11
TRITON_VENV   ?= .venv-triton
TRITON_WHEELS := "nvidia-pytriton==0.7.0" "numpy<2"

.PHONY: capacity capacity-demo

$(TRITON_VENV)/.stamp:
	@test -x $(TRITON_PYTHON) || { echo "error: $(TRITON_PYTHON) not found; apt-get install -y python3.11-venv libpython3.11" >&2; exit 2; }
	$(TRITON_PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --no-deps $(TRITON_WHEELS)
	touch $@

capacity: $(VENV_LOADTEST) $(TRITON_VENV)/.stamp ## open loop: ours on TorchServe and on oip vs the stock handler vs NVIDIA Triton (~10 min idle)
	$(PY) bench/bench_capacity.py $(if $(CAPACITY_RUN),--run $(CAPACITY_RUN)) --reports $(REPORTS) --triton-venv $(TRITON_VENV) $(CAPACITY_ARGS)

capacity-demo: $(VENV_LOADTEST) ## the open-loop generator vs a closed loop on a server that stalls
	$(PY) -m loadtest.stall_demo
