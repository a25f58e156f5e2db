# Relay. `make run` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080

.PHONY: run test test-deflate lint typecheck bench bench-scale cluster chaos clean setup

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null || { echo "redis-server is missing: run .ci/setup-system (as root) or apt-get install redis-server"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	@echo ""
	@echo "Relay: one node, memory engine, http://$(HOST):$(PORT) — ANONYMOUS (demo only), API key 'dev-key'"
	@echo ""
	@echo "  watch a client:   $(VENV)/bin/relay tail demo --url ws://$(HOST):$(PORT) --api-key dev-key"
	@echo "  publish (CLI):    $(VENV)/bin/relay publish demo label.created '{\"id\": 1}' --http http://$(HOST):$(PORT) --api-key dev-key"
	@echo "  publish (curl):   curl -s -H 'Authorization: Bearer dev-key' -d '{\"biz_id\":\"demo\",\"event\":\"label.created\",\"data\":{\"id\":1}}' http://$(HOST):$(PORT)/api/publish"
	@echo "  status page:      http://$(HOST):$(PORT)/  (API key dev-key)"
	@echo "  health:           curl -s http://$(HOST):$(PORT)/readyz"
	@echo "  JS client:        import { RelayClient } from \"http://$(HOST):$(PORT)/client/relay-client.js\" (docs/client.md)"
	@echo ""
	$(VENV)/bin/relay serve --host $(HOST) --port $(PORT) --allow-anonymous --api-key dev-key

# The end-to-end tests run twice: as they are, then with every node answering
# permessage-deflate and compressing every frame, and every test client offering it
# (RELAY_TEST_DEFLATE=1, tests/support/node.py). The second pass is the in-process
# end-to-end files (~35 s): every client-visible behaviour of the one WebSocket server.
# `make test-deflate` runs the whole suite compressed.
DEFLATE_TESTS := tests/test_edge.py tests/test_edge_deflate.py tests/test_hostile.py \
	tests/test_client.py tests/test_auth_e2e.py tests/test_observer.py tests/test_node.py \
	tests/test_ws.py

test: $(STAMP)
	$(PY) -m pytest -q
	RELAY_TEST_DEFLATE=1 $(PY) -m pytest -q $(DEFLATE_TESTS)

test-deflate: $(STAMP)
	RELAY_TEST_DEFLATE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check relay relay_cli backend_adapter tests
	$(VENV)/bin/ruff format --check relay relay_cli backend_adapter tests
	$(VENV)/bin/mypy

# The seed's scenario live: a private Redis, a relay node on PORT and the example label
# service on DEMO_SERVICE_PORT; prints the admin page and the client canvas. Ctrl-C stops all.
DEMO_SERVICE_PORT ?= 8090
demo: $(STAMP)
	$(PY) -m examples.label_service.demo --host $(HOST) --port $(PORT) --service-port $(DEMO_SERVICE_PORT)

# Redis (REDIS=cluster: a 6-process Redis Cluster) + N relay nodes + nginx on loopback
# (deploy/local-cluster.sh); Ctrl-C stops them.
# nginx on PORT, Redis on PORT+1, nodes on PORT+2...; NODES=5 for more nodes.
cluster: $(STAMP)
	deploy/local-cluster.sh run -n $(or $(NODES),3) --base-port $(PORT) --redis $(or $(REDIS),single)

# The long chaos run: random node kills and drains, Redis restarts, stalls and pub/sub
# kills under load through nginx (tests/cluster/test_chaos.py; `make test` runs 2 minutes
# of it). CHAOS_SECONDS, CHAOS_CLIENTS, CHAOS_RATE (events/s), CHAOS_SEED override.
CHAOS_SECONDS ?= 1200
CHAOS_CLIENTS ?= 300
CHAOS_RATE ?= 500
chaos: $(STAMP)
	CHAOS_SECONDS=$(CHAOS_SECONDS) CHAOS_CLIENTS=$(CHAOS_CLIENTS) CHAOS_RATE=$(CHAOS_RATE) \
		$(PY) -m pytest -q -rP -p no:cacheprovider tests/cluster/test_chaos.py

bench: $(STAMP)
	$(PY) -m relay.bench $(BENCH_ARGS)

# 100,000 clients on this box (docs/benchmarks.md, "scale"): ~5 min, ~3 GiB of RAM.
bench-scale: $(STAMP)
	$(PY) -m relay.bench --scenarios scale $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
