# The two commands of the README: `make run` and `make test`. Both install what is missing first.
SHELL := /bin/bash
PY := .venv/bin/python
EXTRA ?= cpu
CONFIG ?= configs/local.yaml
ARGS ?=

.PHONY: setup mcp-servers run test lint format clean

setup:
	@bash scripts/setup.sh $(EXTRA)
	@HF_HUB_OFFLINE=1 .venv/bin/ttpa prepare-model smollm2-135m-instruct

# The MCP servers configs/mcp/servers.json runs, pinned, each in its own virtualenv (.mcp/).
mcp-servers:
	@bash scripts/mcp_servers.sh

run: setup $(if $(findstring mcp,$(CONFIG)),mcp-servers)
	$(PY) -m ttpa_ray.cli run --config $(CONFIG) $(ARGS)

test: setup mcp-servers lint
	$(PY) -m pytest -q tests --durations=25 $(ARGS)

lint: setup
	.venv/bin/ruff check ttpa_ray jobs tests bench configs
	.venv/bin/ruff format --check ttpa_ray jobs tests bench configs
	.venv/bin/mypy --show-traceback ttpa_ray

format: setup
	.venv/bin/ruff check --fix ttpa_ray jobs tests bench configs
	.venv/bin/ruff format ttpa_ray jobs tests bench configs

clean:
	rm -rf runs models .mcp .pytest_cache .mypy_cache .ruff_cache
