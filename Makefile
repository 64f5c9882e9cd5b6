# Quick start: `make demo` runs examples/quickstart.py, `make test` runs the whole test suite
# (which also builds the docs site strictly and runs every snippet of README.md and docs/).
# Both create .venv and install functx (editable) with the pinned versions from constraints.txt.
#
# Which torch: pip installs torch==2.13.0 from the package index it is configured with. On Linux,
# PyPI's torch wheel is the CUDA build (several GB with its NVIDIA libraries; it also runs on a
# CPU-only machine). For the small CPU-only build, name PyTorch's CPU index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (pip then prefers its 2.13.0+cpu wheel). macOS and Windows wheels from PyPI are CPU builds.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.functx-installed
EXTRAS ?= test,docs,plot,examples
TORCH_INDEX ?=
PIP_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
# curvlinops (the reference of the KFAC comparison tests) declares backpack-for-pytorch, which pulls
# torchvision, whose wheels are built against one torch build and break with the others. curvlinops
# imports neither: it is installed without its declared dependencies, and what it does import
# (einops, einconv, linear_operator, tqdm, scipy, numpy) comes with the `test` extra.
CURVLINOPS := curvlinops-for-pytorch

.PHONY: demo test test-suite lint docs docs-serve bench bench-docs bench-compare cookbook min-venv test-min latest-venv test-latest clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_INDEX) -c constraints.txt -e ".[$(EXTRAS)]"
	$(if $(findstring test,$(EXTRAS)),$(PY) -m pip install -q --no-deps -c constraints.txt $(CURVLINOPS))
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: lint
	$(PY) -m pytest

# The suite alone (no lint); .ci/run also runs it under OMP_NUM_THREADS=1.
test-suite: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider

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

# functx against laplace-torch 0.3 and kronfluence 1.0.1 (examples/laplace.py, influence.py) in
# their own venv: laplace-torch imports torchvision, whose index wheel needs the index's torch
# (a CUDA build that runs on CPU, ~5 GB). Never installed in the test venv or needed at runtime.
COMPARE_VENV ?= .venv-compare
bench-compare:
	$(PYTHON) -m venv $(COMPARE_VENV)
	$(COMPARE_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1 laplace-torch==0.3 kronfluence==1.0.1 scikit-learn
	$(COMPARE_VENV)/bin/pip install -q -e .
	OMP_NUM_THREADS=1 $(COMPARE_VENV)/bin/python benchmarks/compare_laplace_influence.py

# Rerun the cookbook examples and store their printed output and figures for the site.
cookbook: $(STAMP)
	$(PY) docs/_render_cookbook.py

# The oldest versions the package claims (constraints-min.txt: Python 3.10, the oldest torch and
# optree), in a second venv. PyPI's Linux torch wheels are CUDA builds: about 5 GB and several
# minutes to install (TORCH_INDEX works here too). With pyenv: `PYENV_VERSION=3.10.13 make test-min`.
MIN_VENV ?= .venv-min
MIN_PYTHON ?= python3.10
MIN_STAMP := $(MIN_VENV)/.functx-installed
$(MIN_STAMP): pyproject.toml constraints-min.txt
	$(MIN_PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --no-cache-dir $(PIP_INDEX) -c constraints-min.txt -e . torch optree pytest hypothesis numpy
	touch $(MIN_STAMP)

min-venv: $(MIN_STAMP)

test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -c "import sys, torch, optree; print('test-min:', sys.version.split()[0], 'torch', torch.__version__, 'optree', optree.__version__)"
	$(MIN_VENV)/bin/python -m pytest -p no:cacheprovider

# The newest torch and optree the index offers (the other end of "torch >= 2.13"), in a third venv,
# with the `test` extra pinned as in constraints.txt. On Linux from PyPI: the CUDA build, ~5 GB.
LATEST_VENV ?= .venv-latest
LATEST_STAMP := $(LATEST_VENV)/.functx-installed
$(LATEST_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(LATEST_VENV)
	grep -v -E '^(torch|optree)==' constraints.txt > $(LATEST_VENV)/constraints.txt
	$(LATEST_VENV)/bin/python -m pip install -q --no-cache-dir $(PIP_INDEX) -c $(LATEST_VENV)/constraints.txt --upgrade -e ".[test]" torch optree
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps -c $(LATEST_VENV)/constraints.txt $(CURVLINOPS)
	touch $(LATEST_STAMP)

latest-venv: $(LATEST_STAMP)

test-latest: $(LATEST_STAMP)
	$(LATEST_VENV)/bin/python -c "import sys, torch, optree; print('test-latest:', sys.version.split()[0], 'torch', torch.__version__, 'optree', optree.__version__)"
	$(LATEST_VENV)/bin/python -m pytest -p no:cacheprovider

clean:
	rm -rf $(VENV) $(MIN_VENV) $(LATEST_VENV) .pytest_cache build site *.egg-info
