# One entry point for people and CI. Each target creates the virtual environment it needs.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, pinned to the CPU wheel: an unpinned torch resolves to a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: venv run test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[train,serve,dev,spark]"
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/hgvae run

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: venv
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
