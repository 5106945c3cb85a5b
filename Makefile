# Two entry points (README): `make demo` and `make test`. Both set up .venv first.
#
# torch goes in first, pinned: any unpinned torch pulls several GB of CUDA wheels. On a machine
# where the system Python already has torch (a GPU cluster), the venv sees it through
# --system-site-packages and every later pip call is constrained to that exact version.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-gpu bench clean

$(VENV)/.installed: pyproject.toml requirements/base.txt requirements/test.txt tools/_tv_cpu_fix.py
	@set -e; \
	if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  tv=$$($(PYTHON) -c "import torch; print(torch.__version__.split('+')[0])"); \
	  echo "[setup] using the system torch $$tv"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  tv=$(TORCH_VERSION); \
	  $(PYTHON) -m venv $(VENV); \
	  $(PIP) install -q "torch==$$tv"; \
	fi; \
	echo "torch==$$tv" > $(VENV)/constraints.txt; \
	$(PIP) install -q -c $(VENV)/constraints.txt -r requirements/base.txt -r requirements/test.txt; \
	sp=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	cp tools/_tv_cpu_fix.py "$$sp/"; echo "import _tv_cpu_fix; _tv_cpu_fix.install()" > "$$sp/_tv_cpu_fix.pth"; \
	$(PIP) install -q --no-deps --no-build-isolation -e .; \
	$(PY) -c "import torch, hydra, diffusers, webdataset, streaming; print('[setup] ok: torch', torch.__version__)"; \
	touch $@

setup: $(VENV)/.installed

# The main job on the built-in dataset: train the debug FlowDCN on scikit-learn's 8x8 digits,
# sample a class-by-class grid with CFG, report classifier accuracy of the samples.
demo: setup
	$(PY) -m trainer.train experiment=digits

test: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q $(PYTEST_ARGS)

# On a CUDA machine: every GPU test (pytest -m cuda); the benchmarks are in bench/ (README).
test-gpu: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q -m cuda tests/

clean:
	rm -rf $(VENV) outputs runs
