# ---- deploy: serving image, docker-compose, Kubernetes (deploy/) ----------------------------------
# make docker-build [VARIANT=cpu|cuda] [RUNTIME=oip]   image visionpipe-serve:$(VARIANT) (RUNTIME=oip:
#                                        visionpipe-oip, the Java-free runtime) with model_store/*.mar baked in
# make docker-smoke [RUNTIME=oip]        podman: build on a debootstrapped bookworm, run, post digits
# make container-config                 deploy/config/config.properties from serving/config.properties
# make k8s-validate                      render + schema-validate + checkov + hadolint, offline
# make k8s-deploy [OVERLAY=cpu|gpu|oip]  kubectl apply -k (plus monitoring when its CRDs exist)
# make k8s-smoke                         port-forward the Service, post golden images, check labels
# make gpu-wheels                        .gpu-wheels/: what the GPU check installs on a bare GPU machine
# make gpu-oip                           the GPU check (bench/gpu_oip.py) here: CUDA vs CPU, or CPU alone
VARIANT     ?= cpu
OVERLAY     ?= cpu
# RUNTIME (mk/serve.mk; empty: torchserve) picks the image: TorchServe's, or the Java-free runtime's.
IMAGE_RUNTIME := $(or $(RUNTIME),torchserve)
IMAGE_torchserve      := visionpipe-serve
IMAGE_oip             := visionpipe-oip
# One Dockerfile for both serving images, a target per runtime (--target $(IMAGE_RUNTIME)).
DOCKERFILE            := deploy/docker/Dockerfile
SMOKE_torchserve      := deploy/smoke/docker_smoke.sh
SMOKE_oip             := deploy/smoke/oip_smoke.sh
IMAGE       ?= $(IMAGE_$(IMAGE_RUNTIME))
K8S_NS      ?= visionpipe
SMOKE_PORT  ?= 18080
# docker when a daemon answers, else podman when installed (rootless or not), else docker (its error).
ENGINE      ?= $(shell if docker info >/dev/null 2>&1; then echo docker; elif command -v podman >/dev/null; then echo podman; else echo docker; fi)
# CPU images take torch from its CPU-only index; the CUDA image from PyPI (CUDA runtime bundled).
TORCH_INDEX_URL_cpu  := https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL_cuda :=
DOCKER_BUILD_ARGS ?=

.PHONY: docker-build docker-smoke k8s-validate k8s-deploy k8s-smoke gpu-wheels gpu-oip check-image-runtime container-config
# The container's TorchServe config is generated (never committed): make serve's config plus the few
# settings deploy/container_config.py changes. Rendered every time: it takes well under a second.
container-config: $(VENV_SERVE) ## deploy/config/config.properties (image, ConfigMap, KServe) from serving/config.properties
	$(PY) deploy/container_config.py

check-image-runtime:
	@case "$(IMAGE_RUNTIME)" in torchserve|oip) ;; *) echo "error: RUNTIME=$(RUNTIME): use RUNTIME=torchserve (or none) or RUNTIME=oip" >&2; exit 2;; esac

# --format docker: podman's default OCI image format drops HEALTHCHECK and SHELL.
docker-build: check-image-runtime container-config ## [VARIANT=cpu|cuda] [RUNTIME=oip] image visionpipe-serve:VARIANT (oip: visionpipe-oip:VARIANT) with model_store/*.mar baked in
	@case "$(VARIANT)" in cpu|cuda) ;; *) echo "error: VARIANT=$(VARIANT): use VARIANT=cpu or VARIANT=cuda" >&2; exit 2;; esac
	@ls model_store/*.mar >/dev/null 2>&1 || echo "warning: no model_store/*.mar: the image will need models mounted at /opt/visionpipe/model-store (make archive bakes them in)" >&2
	$(ENGINE) build $(if $(filter podman,$(ENGINE)),--format docker) -f $(DOCKERFILE) --target $(IMAGE_RUNTIME) \
	  --build-arg VARIANT=$(VARIANT) --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL_$(VARIANT)) \
	  $(DOCKER_BUILD_ARGS) -t $(IMAGE):$(VARIANT) .

docker-smoke: $(VENV_SERVE) check-image-runtime ## [RUNTIME=oip] podman: build on a debootstrapped bookworm, run, post digits
	PY=$(PY) $(SMOKE_$(IMAGE_RUNTIME))

k8s-validate: $(VENV_ALL) container-config ## render + schema-validate + checkov + hadolint, offline
	$(PY) deploy/validate.py

k8s-deploy: container-config ## [OVERLAY=cpu|gpu|oip] kubectl apply -k (plus monitoring when its CRDs exist)
	@case "$(OVERLAY)" in cpu|gpu|oip) ;; *) echo "error: OVERLAY=$(OVERLAY): use OVERLAY=cpu, gpu or oip (the Java-free runtime)" >&2; exit 2;; esac
	kubectl apply -k deploy/k8s/overlays/$(OVERLAY)
	@if kubectl get crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1; then \
	  kubectl apply -k deploy/k8s/monitoring; \
	else echo "note: no ServiceMonitor CRD (kube-prometheus-stack) in this cluster; skipped deploy/k8s/monitoring"; fi
	kubectl -n $(K8S_NS) rollout status deployment/visionpipe-serve --timeout=600s

# Port-forward goes through the API server to one pod, so it needs no Ingress and works on kind.
k8s-smoke: $(VENV_SERVE) ## port-forward the Service, post golden images, check labels
	@kubectl -n $(K8S_NS) port-forward service/visionpipe-serve $(SMOKE_PORT):8080 >/tmp/visionpipe-port-forward.log 2>&1 & pf=$$!; \
	trap 'kill $$pf 2>/dev/null' EXIT; \
	for i in $$(seq 1 30); do curl -sf http://127.0.0.1:$(SMOKE_PORT)/ping >/dev/null 2>&1 && break; sleep 1; done; \
	status=0; for r in $(SERVED_RUNS); do \
	  $(PY) deploy/smoke/predict_check.py --url http://127.0.0.1:$(SMOKE_PORT) --run $$r; s=$$?; \
	  if [ $$s -eq 2 ]; then echo "note: $$r has no labelled test images here (e.g. CIFAR-10 files absent): not counted"; \
	  elif [ $$s -ne 0 ]; then status=1; fi; \
	done; exit $$status

# The GPU check of the Java-free runtime (bench/gpu_oip.py) runs on a machine without this venv or a
# package registry: gpu-wheels fetches what it may lack, at the lock's versions, for Python 3.12 (that
# machine) and 3.11 (this venv), torchserve without its Java jar (~28 MiB; .gpu-wheels/ is ignored).
# There: python3 bench/gpu_oip.py --out DIR, with .gpu-wheels, runs/digits/best.pt and
# model_store/digits.mar carried (docs/deploy.md).
gpu-wheels: $(VENV_BASE) ## .gpu-wheels/: the wheels the GPU check installs on a bare GPU machine
	$(PY) bench/gpu_oip.py wheels

GPU_OIP_ARGS ?=
gpu-oip: $(VENV_BASE) ## the GPU check here: serve digits on cuda:0 and CPU, post digits, capacity (CPU alone without CUDA); reports/gpu_oip/
	$(PY) bench/gpu_oip.py --out $(or $(REPORTS),reports)/gpu_oip $(GPU_OIP_ARGS)
