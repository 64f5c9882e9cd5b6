# Quick start: `make demo` runs examples/quickstart.py, `make test` runs the whole test suite
# (which also builds the docs site strictly and runs every snippet of README.md and docs/).
# Both create .venv and install functx (editable) with the pinned versions from constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.functx-installed
EXTRAS ?= test,docs,plot

.PHONY: demo test lint docs docs-serve bench bench-docs cookbook min-venv test-min clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: lint
	$(PY) -m pytest

# ruff (lint + format) over the Python sources and mypy over functx/, all clean.
LINTED := functx tests benchmarks examples docs
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

# The site, built strictly (a broken link or reference fails) into site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

bench: $(STAMP)
	$(PY) benchmarks/run.py

# Run every benchmark and regenerate docs/benchmarks.md (the one place where numbers live).
bench-docs: $(STAMP)
	$(PY) benchmarks/run.py --write-docs

# Rerun the cookbook examples and store their printed output and figures for the site.
cookbook: $(STAMP)
	$(PY) docs/_render_cookbook.py

# The oldest versions the package claims (constraints-min.txt: Python 3.10, the oldest torch and
# optree), in a second venv. PyPI's Linux torch wheels are CUDA builds: about 5 GB and several
# minutes to install. With pyenv: `PYENV_VERSION=3.10.13 make test-min`.
MIN_VENV ?= .venv-min
MIN_PYTHON ?= python3.10
MIN_STAMP := $(MIN_VENV)/.functx-installed
$(MIN_STAMP): pyproject.toml constraints-min.txt
	$(MIN_PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --no-cache-dir -c constraints-min.txt -e . torch optree pytest hypothesis numpy
	touch $(MIN_STAMP)

min-venv: $(MIN_STAMP)

test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -c "import sys, torch, optree; print('test-min:', sys.version.split()[0], 'torch', torch.__version__, 'optree', optree.__version__)"
	$(MIN_VENV)/bin/python -m pytest -p no:cacheprovider

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache build site *.egg-info
