# Entry points: `make demo` (the main job, on real Fashion-MNIST), `make test`, `make lint`, `make bench`.
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

# Fashion-MNIST from Debian's dataset-fashion-mnist (installed as root), else from the Hub; where neither works, the
# demo falls back to scikit-learn's bundled digits and says so.
demo: install
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null || true; fi
	@if [ -d /usr/share/datasets/fashion-mnist ] || \
	  $(PYTHON) -c "from hf_oscq.scripts.data import load_image_dataset; load_image_dataset('fashion_mnist')" 2>/dev/null; then \
	  $(PYTHON) recipes/train_resnet18.py --config recipes/configs/resnet18_fashion_mnist_demo.yaml; \
	else \
	  echo "demo: Fashion-MNIST is not available (no dataset-fashion-mnist package, no Hub access): running the digits demo instead, where FP + PTQ is already lossless at 3 bits and every model fails at 2."; \
	  $(PYTHON) recipes/train_vit.py --config recipes/configs/digits_demo.yaml; \
	fi

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
