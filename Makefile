# Everything a fresh machine needs: `make demo` and `make test` create the venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxprune-installed

.PHONY: install demo test test-plain test-latest lint bench clean

$(STAMP): pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# The supported pair; both wheels are served from local disk on the project machines.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# Every other package at the exact version the suite was last run with (docs/dependencies.md).
	$(PY) -m pip install -q -r requirements-lock.txt -e ".[test,yolo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/fxprune compile models_zoo:resnet18 --ratio 0.5 --onnx out/resnet18_pruned.onnx --report out/report.md

# The core (oracle over models_zoo, rules, registry, fuzz regressions, trust) runs again with every speed
# shortcut off (fxprune/fast.py): both settings must give the same, correct results.
CORE_TESTS := tests/test_zoo_oracle.py tests/test_rules.py tests/test_registry.py tests/test_fuzz.py tests/test_trust.py tests/test_fast.py

test: $(STAMP)
	$(PY) -m ruff check fxprune models_zoo tests benchmarks examples tools
	$(PY) -m pytest
	FXPRUNE_FAST=0 $(PY) -m pytest $(CORE_TESTS)

test-plain: $(STAMP)
	FXPRUNE_FAST=0 $(PY) -m pytest $(CORE_TESTS)

lint: $(STAMP)
	$(PY) -m ruff check fxprune models_zoo tests benchmarks examples tools

# The Hugging Face, timm and Ultralytics tests against the newest releases of those libraries, in a venv of
# its own (.venv-latest), with the versions that differ from the lock printed first (docs/dependencies.md).
LATEST_TESTS := tests/test_transformers.py tests/test_llm_families.py tests/test_hidden_size.py \
	tests/test_activation_importance.py tests/test_experts.py tests/test_cli_hf.py tests/test_replay.py \
	tests/test_partial.py tests/test_yolo.py tests/test_coverage_subset.py

test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	# The package without its bounds (they stop at the lock), then every dependency at its newest release.
	.venv-latest/bin/python -m pip install -q --no-deps -e .
	.venv-latest/bin/python -m pip install -q --upgrade transformers timm ultralytics torch-pruning onnx onnxsim \
		onnxruntime onnxscript onnxslim numpy scipy networkx tqdm matplotlib pytest ruff scikit-learn safetensors
	.venv-latest/bin/python tools/lock_diff.py requirements-lock.txt
	.venv-latest/bin/python -m pytest $(LATEST_TESTS)

bench: $(STAMP)
	$(PY) benchmarks/compare_torch_pruning.py

clean:
	rm -rf $(VENV) .venv-latest out .pytest_cache
