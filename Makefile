# The two commands of the README: `make run` and `make test`. Both install what is missing first.
SHELL := /bin/bash
PY := .venv/bin/python
EXTRA ?= cpu
CONFIG ?= configs/local.yaml
ARGS ?=

.PHONY: setup run test lint format clean

setup:
	@bash scripts/setup.sh $(EXTRA)
	@HF_HUB_OFFLINE=1 .venv/bin/ttpa prepare-model smollm2-135m-instruct

run: setup
	$(PY) -m ttpa_ray.cli run --config $(CONFIG) $(ARGS)

test: setup lint
	$(PY) -m pytest -q tests --durations=25 $(ARGS)

lint: setup
	.venv/bin/ruff check ttpa_ray jobs tests bench
	.venv/bin/ruff format --check ttpa_ray jobs tests bench
	.venv/bin/mypy --show-traceback ttpa_ray

format: setup
	.venv/bin/ruff check --fix ttpa_ray jobs tests bench
	.venv/bin/ruff format ttpa_ray jobs tests bench

clean:
	rm -rf runs models .pytest_cache .mypy_cache .ruff_cache
