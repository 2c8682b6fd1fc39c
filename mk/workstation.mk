# ---- workstation: Jupyter Lab (token) + SSH (keys only) in a container (deploy/docker/workstation/) --
# make workstation [VARIANT=cpu|cuda]   build visionpipe-workstation and run it: Jupyter on 127.0.0.1:8888,
#                                       SSH on 127.0.0.1:2222, this checkout at /workspace (WS_BIND=0.0.0.0
#                                       to reach it from other machines; WS_CPUS, WS_MEMORY cap it)
# make workstation-stop                 stop and remove the container (volumes and home volume stay)
# make workstation-smoke                podman: build, run read-only, check token/keys/volumes (docs/deploy.md)
WS_IMAGE        ?= visionpipe-workstation
WS_NAME         ?= visionpipe-workstation
# A GPU when nvidia-smi sees one: the CUDA variant and the engine's GPU flag. VARIANT=cpu forces CPU.
WS_GPU          := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
WS_VARIANT      ?= $(if $(filter command line environment,$(origin VARIANT)),$(VARIANT),$(if $(WS_GPU),cuda,cpu))
WS_BIND         ?= 127.0.0.1
WS_JUPYTER_PORT ?= 8888
WS_SSH_PORT     ?= 2222
WS_WORKSPACE    ?= $(CURDIR)
WS_RUNS         ?= $(WS_WORKSPACE)/runs
WS_DATA         ?= $(WS_WORKSPACE)/data
WS_ARTIFACTS    ?= $(WS_WORKSPACE)/artifacts
# Public keys SSH accepts (one file, authorized_keys format): the first of your own by default.
WS_SSH_KEYS     ?= $(firstword $(wildcard $(HOME)/.ssh/id_ed25519.pub $(HOME)/.ssh/id_ecdsa.pub $(HOME)/.ssh/id_rsa.pub))
# A file holding a fixed Jupyter token; empty: a new one at every start, printed once.
WS_TOKEN_FILE   ?=
# Limits: all cores, three quarters of the memory, 2 GiB of /dev/shm (DataLoader workers share tensors
# through it; Docker's default is 64 MiB).
WS_CPUS         ?= $(shell nproc)
WS_MEMORY       ?= $(shell awk '/MemTotal/ {printf "%dg", $$2 * 3 / 4 / 1048576}' /proc/meminfo)
WS_SHM          ?= 2g
WS_TMP          ?= 8g
# The image's user gets your uid/gid so the mounted checkout stays yours (10001 when you are root).
WS_UID          := $(shell u=$$(id -u); [ "$$u" = 0 ] && echo 10001 || echo $$u)
WS_GID          := $(shell g=$$(id -g); [ "$$g" = 0 ] && echo 10001 || echo $$g)
WS_RUN_ARGS     ?=
WS_GPU_FLAG      = $(if $(filter cuda,$(WS_VARIANT)),$(if $(filter podman,$(ENGINE)),--device nvidia.com/gpu=all,--gpus all))
# Rootless podman maps your uid to root in the container unless told to keep it.
WS_USERNS        = $(if $(and $(filter podman,$(ENGINE)),$(filter-out 0,$(shell id -u))),--userns keep-id)

.PHONY: workstation workstation-build workstation-stop workstation-smoke
workstation-build: ## [VARIANT=cpu|cuda] build the visionpipe-workstation image only
	@case "$(WS_VARIANT)" in cpu|cuda) ;; *) echo "error: VARIANT=$(WS_VARIANT): use VARIANT=cpu or VARIANT=cuda" >&2; exit 2;; esac
	$(ENGINE) build $(if $(filter podman,$(ENGINE)),--format docker) -f deploy/docker/workstation/Dockerfile \
	  --build-arg VARIANT=$(WS_VARIANT) --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL_$(WS_VARIANT)) \
	  --build-arg WS_UID=$(WS_UID) --build-arg WS_GID=$(WS_GID) $(DOCKER_BUILD_ARGS) -t $(WS_IMAGE):$(WS_VARIANT) .

# Read-only root: everything writable is a volume (workspace, runs, data, artifacts, home) or /tmp.
workstation: workstation-build ## [VARIANT=cpu|cuda] Jupyter Lab on 127.0.0.1:8888 + SSH on :2222 in a container
	@if [ "$(WS_VARIANT)" = cuda ] && [ -z "$(WS_GPU)" ]; then echo "warning: VARIANT=cuda but nvidia-smi sees no GPU: no GPU flag passed" >&2; fi
	@mkdir -p "$(WS_RUNS)" "$(WS_DATA)" "$(WS_ARTIFACTS)"
	@$(ENGINE) rm -f $(WS_NAME) >/dev/null 2>&1 || true
	$(ENGINE) run -d --name $(WS_NAME) --read-only --tmpfs /tmp:rw,exec,nosuid,nodev,size=$(WS_TMP) \
	  --cap-drop ALL --security-opt no-new-privileges $(WS_USERNS) $(if $(WS_GPU),$(WS_GPU_FLAG)) \
	  --cpus $(WS_CPUS) --memory $(WS_MEMORY) --shm-size $(WS_SHM) --pids-limit 4096 \
	  -p $(WS_BIND):$(WS_JUPYTER_PORT):8888 -p $(WS_BIND):$(WS_SSH_PORT):2222 \
	  -v "$(WS_WORKSPACE)":/workspace -v "$(WS_RUNS)":/workspace/runs -v "$(WS_DATA)":/workspace/data \
	  -v "$(WS_ARTIFACTS)":/workspace/artifacts -v $(WS_NAME)-home:/home/dev \
	  $(if $(WS_SSH_KEYS),-v "$(WS_SSH_KEYS)":/etc/visionpipe/ssh/authorized_keys:ro) \
	  $(if $(WS_TOKEN_FILE),-v "$(WS_TOKEN_FILE)":/etc/visionpipe/jupyter/token:ro) \
	  $(WS_RUN_ARGS) $(WS_IMAGE):$(WS_VARIANT) >/dev/null
	@for i in $$(seq 1 60); do $(ENGINE) logs $(WS_NAME) 2>&1 | grep -q '^workstation: Jupyter Lab' && break; \
	  [ "$$($(ENGINE) inspect -f '{{.State.Running}}' $(WS_NAME))" = true ] || break; sleep 1; done
	@$(ENGINE) logs $(WS_NAME) 2>&1 | grep '^workstation' | sed 's/^workstation: /  /'
	@echo "  in: http://$(WS_BIND):$(WS_JUPYTER_PORT)/lab (token above)$(if $(WS_SSH_KEYS),; ssh -p $(WS_SSH_PORT) dev@$(WS_BIND))"
	@echo "  stop: make workstation-stop   logs: $(ENGINE) logs $(WS_NAME)"

workstation-stop: ## stop and remove the container (its volumes stay)
	$(ENGINE) stop -t 20 $(WS_NAME) >/dev/null && $(ENGINE) rm $(WS_NAME)

workstation-smoke: ## podman: build, run read-only, check token/keys/volumes
	deploy/smoke/workstation_smoke.sh

# Inside the workstation image, `make` uses the image's venv (VENV=/opt/venv), installed from the lock
# and read-only: the venv stamp never triggers a pip install there. After a change to
# pyproject.toml, rebuild the image (make workstation).
ifeq ($(VISIONPIPE_WORKSTATION),1)
$(VENV_BASE): ;
endif
