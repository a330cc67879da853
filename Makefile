# Two commands a new user needs: `make serve` and `make test`.
# Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned and installed first, on its own: a CPU-only machine must never
# resolve a multi-GB CUDA build through another package's loose requirement.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: serve test lint bench loadtest clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

# [tool.swapserve] no-deps in pyproject.toml: packages whose requirements must not be
# installed (pyproject.toml says why); pip has no per-package --no-deps in a dependency list.
NO_DEPS = $(PY) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["swapserve"]["no-deps"]))'

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $$($(NO_DEPS))
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/swapserve serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check server trainer rag clients tests loadtests
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check server trainer rag clients tests loadtests
	$(VENV)/bin/ruff format --check server trainer rag clients tests loadtests
	$(VENV)/bin/mypy server trainer rag

bench: $(VENV)/.installed-test
	$(PY) loadtests/bench_generate.py

$(VENV)/.installed-loadtest: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e ".[loadtest]"
	touch $@

# Bounded locust run on the bundled model; LOADTEST_ARGS e.g. "--users 8 --duration 60"
# or "--steps 2,4,8". Results (CSV, HTML) go to loadtests/results/.
loadtest: $(VENV)/.installed-loadtest
	$(PY) loadtests/run_loadtest.py $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
