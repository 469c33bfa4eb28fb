# Entry points: `make demo` (the main job, bundled digits), `make demo-fashion`, `make test`, `make lint`, `make bench`.
SHELL := /bin/bash
PYTHON ?= python3
SYSTEM_PACKAGES := dataset-fashion-mnist bible-kjv bible-kjv-text chromium chromium-driver

.PHONY: install system-deps demo demo-fashion test lint bench

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev,space]"

# Real Fashion-MNIST for the data tests, the King James Version (public domain) for the language-model recipe and
# its tests, and Chromium for the Space's browser test (Debian packages).
system-deps:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; }; \
	else echo "system-deps: not root or no apt-get; tests needing $(SYSTEM_PACKAGES) will be skipped"; fi

# The bundled-digits demo: fast, offline, the whole pipeline (three runs, cross-bit table, export, cards). In this
# setting FP + PTQ is already lossless at 3 bits and every model fails at 2, so it cannot show the regularizer's gain.
demo: install
	$(PYTHON) recipes/train_vit.py --config recipes/configs/digits_demo.yaml

# ResNet-18 (ImageNet stem) on real Fashion-MNIST from Debian's dataset-fashion-mnist (installed as root), else from
# the Hub: the setting where the measurements show the regularizer's gain (docs/RESULTS.md). Slower than `make demo`;
# `python bench/demo.py --seeds 0 1 2` runs it per seed and checks its table.
demo-fashion: install
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null || true; fi
	$(PYTHON) recipes/train_resnet18.py --config recipes/configs/resnet18_fashion_mnist_demo.yaml

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
