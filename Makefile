# dfserve — the README's commands. Every target installs what it needs on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?=

.PHONY: serve test bench lint install clean

install: $(STAMP)

# torch is pinned to the CPU build on this disk first: a looser pin downloads a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train,test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/dfserve serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	@# the web tests drive Debian's Chromium (Playwright cannot download browsers here)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy model server clients
	mkdir -p artifacts
	$(VENV)/bin/pytest -q -rs --junitxml=artifacts/junit.xml $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/dfserve bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy model server clients

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
