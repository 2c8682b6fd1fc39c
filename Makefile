# train -> export -> serve -> deploy -> load-test.  `make help` lists the targets.
# The Makefile makes its own virtualenv (.venv) and installs the project with the extras each
# target needs; nothing relies on what happens to be installed on the machine.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python

# The two served models, by run name. RUN is the name a model is served under.
SERVED_RUNS     := cifarnet digits
MODEL_cifarnet  := cifarnet
DATASET_cifarnet:= cifar10
EPOCHS_cifarnet := 30
MODEL_digits    := mnist_cnn
DATASET_digits  := mnist
EPOCHS_digits   := 5

RUN      ?=
MODEL    ?= $(or $(MODEL_$(RUN)),mnist_cnn)
DATASET  ?= $(or $(DATASET_$(RUN)),digits)
EPOCHS   ?= $(or $(EPOCHS_$(RUN)),10)
DATA_DIR ?=
RESUME   ?=
ARGS     ?=

# ---- virtualenv: one stamp per set of extras ---------------------------------------------------
$(VENV)/bin/python:
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.stamp-%: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[$(subst +,$(comma),$*)]"
	touch $@

comma := ,
VENV_BASE   := $(VENV)/.stamp-test
VENV_EXPORT := $(VENV)/.stamp-export+test
VENV_SERVE  := $(VENV)/.stamp-serve+test
VENV_ALL    := $(VENV)/.stamp-serve+loadtest+deploy+test

.PHONY: help venv train evaluate demo test clean
help:
	@echo "make demo                 offline: train digits on the embedded data (and later stages)"
	@echo "make test                 the test suite"
	@echo "make train [RUN= MODEL= DATASET= EPOCHS= DATA_DIR= RESUME=1 ARGS=...]"
	@echo "                          no RUN: trains the served models ($(SERVED_RUNS))"
	@echo "make evaluate RUN=... [DATASET=... DATA_DIR=...]"

venv: $(VENV_ALL)

# ---- training ----------------------------------------------------------------------------------
train: $(VENV_BASE)
ifeq ($(RUN),)
	@for r in $(SERVED_RUNS); do $(MAKE) --no-print-directory train RUN=$$r DATA_DIR="$(DATA_DIR)" ARGS="$(ARGS)" || exit 1; done
else
	$(PY) -m training train --run $(RUN) --model $(MODEL) --dataset $(DATASET) --epochs $(EPOCHS) \
	  $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(RESUME),--resume) $(ARGS)
endif

evaluate: $(VENV_BASE)
	$(PY) -m training evaluate --checkpoint runs/$(or $(RUN),digits)/best.pt --dataset $(DATASET) \
	  $(if $(DATA_DIR),--data-dir $(DATA_DIR))

# ---- demo: the whole pipeline, offline ---------------------------------------------------------
DEMO_TRAIN_ARGS := --run digits --model mnist_cnn --dataset digits --epochs 15
demo: $(VENV_BASE)
	$(PY) -m training train $(DEMO_TRAIN_ARGS)
	$(PY) -m training evaluate --checkpoint runs/digits/best.pt --dataset digits

-include mk/*.mk

# ---- tests -------------------------------------------------------------------------------------
PYTEST_ARGS ?=
test: $(VENV_ALL)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf runs artifacts reports logs model_store/*.mar
