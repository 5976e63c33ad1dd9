# Everything a fresh machine needs: `make demo` and `make test` create the venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxprune-installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# The supported pair; both wheels are served from local disk on the project machines.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,yolo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/fxprune compile models_zoo:resnet18 --ratio 0.5 --onnx out/resnet18_pruned.onnx --report out/report.md

test: $(STAMP)
	$(PY) -m ruff check fxprune models_zoo tests benchmarks examples
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check fxprune models_zoo tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/compare_torch_pruning.py

clean:
	rm -rf $(VENV) out .pytest_cache
