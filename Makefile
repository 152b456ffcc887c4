# genq — `make demo` (install + the quick start), `make test` (the whole suite).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch is a plain `torch>=2.4` requirement of the package. It is installed first,
# pinned, so that machines with a local CPU wheel of this release take it instead
# of downloading a multi-GB CUDA build; elsewhere pip takes it from PyPI as usual.
# Override it, e.g. `make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"`.
TORCH_SPEC ?= torch==2.13.0
# The demo runs GENQ_MODEL (default gpt2, from the Hugging Face hub). Offline, a
# local model directory beside the checkout is used when present.
LOCAL_MODEL := $(wildcard ../shared/models/stories260k)
DEMO_MODEL ?= $(if $(LOCAL_MODEL),$(LOCAL_MODEL),gpt2)

.PHONY: install install-browser demo test test-fast lint format bench compose-config clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Headless Chromium for the status page's browser tests (tests/browser), from Debian's
# packages; nothing is downloaded by Selenium. Needs root (CI runs as root).
install-browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		echo "chromium and chromedriver present"; \
	else \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	fi

demo: install
	GENQ_MODEL=$${GENQ_MODEL:-$(DEMO_MODEL)} GENQ_REQUIRE_AUTH=$${GENQ_REQUIRE_AUTH:-false} \
		$(VENV)/bin/genq demo

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not integration and not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy core api worker cli migrations bench

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) -m bench.throughput --workload uniform

# Docker Compose v2 (`docker compose`) where present, else v1 (`docker-compose`).
compose-config:
	@if docker compose version >/dev/null 2>&1; then \
		docker compose -f docker-compose.yml config -q; \
	else \
		docker-compose -f docker-compose.yml config -q; \
	fi
	@echo "docker-compose.yml is valid"

clean:
	rm -rf .genq .pytest_cache .mypy_cache .ruff_cache
