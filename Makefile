# dfserve — the README's commands. Every target installs what it needs on a fresh machine,
# and no more: serving needs the package alone; the test and training extras come with
# `make test` and `make train`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve
TRAIN_STAMP := $(VENV)/.installed-train
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?=
# make train: a dataset from the real Crafter environment, then a denoiser and its edge fill
# (DEVELOPERS.md has the exact recipe of the shipped model)
CONFIG   ?= crafter-cpu-gated# the denoiser; the default model adds EDGE_FILL's edge fill to it
EDGE_FILL ?= crafter-cpu# empty: stop at the denoiser (needed for a CONFIG other than crafter-cpu-gated)
EDGE_MINUTES ?= 20
SIZE     ?= 72# frame size of CONFIG: 72 (one 8-px patch per Crafter tile); crafter-cpu-v1 64
EPISODES ?= 400
DATA     ?= data/crafter$(SIZE)-train$(EPISODES)
HELDOUT  ?= data/crafter$(SIZE)-heldout
BUNDLE   ?= runs/$(CONFIG)-bundle
MINUTES  ?= 60
INIT     ?=# a bundle to warm-start from, e.g. model/bundles/crafter-cpu

.PHONY: serve test train bench lint install clean

install: $(STAMP)

# torch is pinned to the CPU build on this disk first: a looser pin downloads a CUDA build.
$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0

$(SERVE_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

$(TRAIN_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[train]'
	touch $@

# Everything (the tests cover training too): what `make test`, `make lint` and `make bench` use.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[train,test]'
	touch $(SERVE_STAMP) $(TRAIN_STAMP) $@

serve: $(SERVE_STAMP)
	$(VENV)/bin/dfserve serve --host $(HOST) --port $(PORT)

train: $(TRAIN_STAMP) $(DATA)/meta.json $(HELDOUT)/meta.json
	$(VENV)/bin/dfserve train --config $(CONFIG) --data $(DATA) --heldout $(HELDOUT) \
	    --out $(BUNDLE) --minutes $(MINUTES) --threads 2 $(if $(INIT),--init $(INIT))
	$(if $(EDGE_FILL),$(VENV)/bin/dfserve train --config $(EDGE_FILL) --edge-fill --init $(BUNDLE) \
	    --data $(DATA) --heldout $(HELDOUT) --out runs/$(EDGE_FILL)-bundle \
	    --minutes $(EDGE_MINUTES) --threads 2)

$(DATA)/meta.json: | $(TRAIN_STAMP)
	$(VENV)/bin/dfserve dataset crafter --size $(SIZE) --episodes $(EPISODES) --out $(DATA)

$(HELDOUT)/meta.json: | $(TRAIN_STAMP)
	$(VENV)/bin/dfserve dataset crafter --size $(SIZE) --episodes 16 --seed-start 1000000 \
	    --out $(HELDOUT)

test: $(STAMP)
	@# the web tests drive Debian's Chromium (Playwright cannot download browsers here)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy -p dfserve.model -p dfserve.server -p dfserve.clients
	mkdir -p artifacts
	@# two processes, one per core of the 2-core CI machine (one process leaves a core idle while
	@# a test waits on a subprocess or a socket); a module's tests stay together (its fixtures start
	@# servers), and every test takes its own ports and Redis prefix
	$(VENV)/bin/pytest -q -rs -n 2 --dist loadfile --junitxml=artifacts/junit.xml $(PYTEST_ARGS)

bench: $(SERVE_STAMP)
	$(VENV)/bin/dfserve bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy -p dfserve.model -p dfserve.server -p dfserve.clients

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
