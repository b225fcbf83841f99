# The two commands of the README: `make demo` (the whole pipeline on the embedded default) and
# `make test` (the test suite). Both create .venv and install on first use; they need only
# Python 3.11 (python3.11 or python3 on PATH) and pip access to PyPI and to PyTorch's CPU wheel index,
# download.pytorch.org/whl/cpu (not needed where pip's find-links already hold torch's CPU wheel).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration bench bench-quick lint typecheck clean readme-config

# torch's CPU build, named explicitly: on Linux, PyPI's torch==X is the CUDA build and pulls several GB
# of nvidia-* wheels. The lock pins the version (torch==X, platform-neutral: the Dockerfile's CUDA
# image uses the same lock); this step picks the build: X+cpu from a local wheel cache (pip's
# find-links, where a machine has one: no network needed) or else PyTorch's CPU index. The next
# step's torch==X is then already satisfied (X+cpu is an X), so pip keeps the CPU build.
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements/lock-cpu.txt)
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml requirements/lock-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps --no-index "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(PY) -m pip install --quiet --no-deps --index-url $(TORCH_INDEX_URL) "torch==$(TORCH_VERSION)+cpu"
	$(PY) -m pip install --quiet -c requirements/lock-cpu.txt -e '.[dev]'
	$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 'torch ' + torch.__version__ + ' is not the CPU build')"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/embsum run

test: $(STAMP)
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

bench: $(STAMP)
	$(PY) -m bench all

bench-quick: $(STAMP)
	$(PY) -m bench all --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check embsum train serve bench tests

typecheck: $(STAMP)  ## mypy (settings in pyproject.toml) on the library and the two programs
	$(VENV)/bin/mypy embsum serve train

clean:
	rm -rf runs .pytest_cache

readme-config:  ## regenerate the README's config reference from the config fields' descriptions
	$(PY) -c "import re,pathlib; from embsum.config import config_reference as c; p=pathlib.Path('README.md'); t=p.read_text(); p.write_text(re.sub(r'(<!-- config-reference:start -->\n).*?(\n<!-- config-reference:end -->)', lambda m: m.group(1)+c().strip()+m.group(2), t, flags=re.S))"
