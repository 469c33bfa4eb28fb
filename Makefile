# Entry points: `make demo` (the main job: Fashion-MNIST), `make demo-digits`, `make test`, `make lint`, `make bench`.
SHELL := /bin/bash
PYTHON ?= python3
SYSTEM_PACKAGES := dataset-fashion-mnist bible-kjv bible-kjv-text chromium chromium-driver

.PHONY: install system-deps fashion-mnist demo demo-digits test lint bench

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev,space]"

# Real Fashion-MNIST for the data tests, the King James Version (public domain) for the language-model recipe and
# its tests, and Chromium for the Space's browser test (Debian packages).
system-deps:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; }; \
	else echo "system-deps: not root or no apt-get; tests needing $(SYSTEM_PACKAGES) will be skipped"; fi

FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

# Debian's dataset-fashion-mnist (the real Fashion-MNIST IDX files), installed when run as root with apt-get.
fashion-mnist:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null || true; fi

# The main job: ResNet-18 (timm, ImageNet stem) on real Fashion-MNIST, the regularizer at 3 bits with the package's
# defaults next to QAT @3 and FP + PTQ, the cross-bit table, exports w2..w8 and model cards in
# outputs/fashion_mnist_demo (about 4 minutes on 2 idle CPU cores). Where Debian's Fashion-MNIST cannot be installed
# (no apt-get, not root) it runs the digits demo instead and says so.
demo: install fashion-mnist
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  $(PYTHON) recipes/train_resnet18.py --config recipes/configs/resnet18_fashion_mnist_demo.yaml; \
	else \
	  echo "make demo: Fashion-MNIST is not in $(FASHION_MNIST_DIR) (apt-get install dataset-fashion-mnist, as root)."; \
	  echo "make demo: running the digits demo instead (make demo-digits), which shows the pipeline on bundled data."; \
	  $(MAKE) --no-print-directory demo-digits; \
	fi

# The bundled-digits demo: a micro ViT, offline everywhere, the whole pipeline (three runs, cross-bit table, export,
# cards) in outputs/digits_demo.
demo-digits: install
	$(PYTHON) recipes/train_vit.py --config recipes/configs/digits_demo.yaml

test: install system-deps
	$(PYTHON) -m pytest -ra --durations=20

lint: install
	ruff check .
	ruff format --check .  # Python files and the Python blocks of the Markdown docs

bench: install
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(PYTHON) bench/overhead.py
	$(PYTHON) bench/export_size.py
	$(PYTHON) bench/import_cost.py
	$(PYTHON) bench/runtime_memory.py
