# ---- deploy: serving image, docker-compose, Kubernetes (deploy/) ----------------------------------
# make docker-build [VARIANT=cpu|cuda]   image visionpipe-serve:$(VARIANT) with model_store/*.mar baked in
# make docker-smoke                      podman: build on a debootstrapped bookworm, run, post digits
# make k8s-validate                      render + schema-validate + checkov + hadolint, offline
# make k8s-deploy [OVERLAY=cpu|gpu]      kubectl apply -k (plus monitoring when its CRDs exist)
# make k8s-smoke                         port-forward the Service, post golden images, check labels
VARIANT     ?= cpu
OVERLAY     ?= cpu
IMAGE       ?= visionpipe-serve
K8S_NS      ?= visionpipe
SMOKE_PORT  ?= 18080
# docker when a daemon answers, else podman when installed (rootless or not), else docker (its error).
ENGINE      ?= $(shell if docker info >/dev/null 2>&1; then echo docker; elif command -v podman >/dev/null; then echo podman; else echo docker; fi)
# CPU images take torch from its CPU-only index; the CUDA image from PyPI (CUDA runtime bundled).
TORCH_INDEX_URL_cpu  := https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL_cuda :=
DOCKER_BUILD_ARGS ?=

.PHONY: docker-build docker-smoke k8s-validate k8s-deploy k8s-smoke
# --format docker: podman's default OCI image format drops HEALTHCHECK and SHELL.
docker-build: ## [VARIANT=cpu|cuda] image visionpipe-serve:VARIANT with model_store/*.mar baked in
	@case "$(VARIANT)" in cpu|cuda) ;; *) echo "error: VARIANT=$(VARIANT): use VARIANT=cpu or VARIANT=cuda" >&2; exit 2;; esac
	@ls model_store/*.mar >/dev/null 2>&1 || echo "warning: no model_store/*.mar: the image will need models mounted at /opt/visionpipe/model-store (make archive bakes them in)" >&2
	$(ENGINE) build $(if $(filter podman,$(ENGINE)),--format docker) -f deploy/docker/Dockerfile \
	  --build-arg VARIANT=$(VARIANT) --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL_$(VARIANT)) \
	  $(DOCKER_BUILD_ARGS) -t $(IMAGE):$(VARIANT) .

docker-smoke: $(VENV_SERVE) ## podman: build on a debootstrapped bookworm, run, post digits
	PY=$(PY) deploy/smoke/docker_smoke.sh

k8s-validate: $(VENV_ALL) ## render + schema-validate + checkov + hadolint, offline
	$(PY) deploy/validate.py

k8s-deploy: ## [OVERLAY=cpu|gpu] kubectl apply -k (plus monitoring when its CRDs exist)
	@case "$(OVERLAY)" in cpu|gpu) ;; *) echo "error: OVERLAY=$(OVERLAY): use OVERLAY=cpu or OVERLAY=gpu" >&2; exit 2;; esac
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
