# The two commands of the README: `make demo` (the whole pipeline on the embedded default) and
# `make test` (the test suite). Both create .venv and install on first use; they need only
# Python 3.11 (python3.11 or python3 on PATH) and pip access to PyPI.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration bench bench-quick lint clean readme-config

$(STAMP): pyproject.toml requirements/lock-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The lock pins the CPU build of torch (an unpinned torch pulls GBs of CUDA wheels).
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/lock-cpu.txt -e '.[dev]'
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

clean:
	rm -rf runs .pytest_cache

readme-config:  ## regenerate the README's config reference from the dataclass docs
	$(PY) -c "import re,pathlib; from embsum.config import config_reference as c; p=pathlib.Path('README.md'); t=p.read_text(); p.write_text(re.sub(r'(<!-- config-reference:start -->\n).*?(\n<!-- config-reference:end -->)', lambda m: m.group(1)+c().strip()+m.group(2), t, flags=re.S))"
