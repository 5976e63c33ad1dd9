# Everything a fresh machine needs: `make demo` and `make test` create the venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxprune-installed

.PHONY: install demo test test-plain lint bench clean

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

# The core (oracle over models_zoo, rules, registry, fuzz regressions, trust) runs again with every speed
# shortcut off (fxprune/fast.py): both settings must give the same, correct results.
CORE_TESTS := tests/test_zoo_oracle.py tests/test_rules.py tests/test_registry.py tests/test_fuzz.py tests/test_trust.py tests/test_fast.py

test: $(STAMP)
	$(PY) -m ruff check fxprune models_zoo tests benchmarks examples
	$(PY) -m pytest
	FXPRUNE_FAST=0 $(PY) -m pytest $(CORE_TESTS)

test-plain: $(STAMP)
	FXPRUNE_FAST=0 $(PY) -m pytest $(CORE_TESTS)

lint: $(STAMP)
	$(PY) -m ruff check fxprune models_zoo tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/compare_torch_pruning.py

clean:
	rm -rf $(VENV) out .pytest_cache
