# Entry points: `make demo` (main job on bundled data), `make test`, `make lint`, `make bench`.
SHELL := /bin/bash
PYTHON ?= python3
SYSTEM_PACKAGES := dataset-fashion-mnist chromium chromium-driver

.PHONY: install system-deps demo test lint bench

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev,space]"

# Real Fashion-MNIST for the data tests and Chromium for the Space's browser test (Debian packages).
system-deps:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; }; \
	else echo "system-deps: not root or no apt-get; tests needing $(SYSTEM_PACKAGES) will be skipped"; fi

demo: install
	$(PYTHON) recipes/train_vit.py --config recipes/configs/digits_demo.yaml

test: install system-deps
	$(PYTHON) -m pytest -ra

lint: install
	ruff check hf_oscq tests bench recipes space
	ruff format --check hf_oscq tests bench recipes space

bench: install
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(PYTHON) bench/overhead.py
	$(PYTHON) bench/export_size.py
	$(PYTHON) bench/import_cost.py
	$(PYTHON) bench/runtime_memory.py
