# The two commands a fresh machine needs: `make demo` and `make test`.
# Both do their own set-up; nothing installed by hand is assumed. Between edits: `make check`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8765
LINT_PATHS := $(wildcard ftstudio tests bench)
SLURM_CLUSTER := scripts/slurm-dev-cluster
# pytest-xdist workers for `make test` (tests/conftest.py keeps together what must not run side by side).
TEST_WORKERS ?= 2

.PHONY: demo test check lint setup browser gguf clean bench slurm-up slurm-down slurm2-up slurm2-down

$(STAMP): pyproject.toml requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: the CPU build lies on disk; anything else would pull a multi-GB CUDA build.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --config-settings editable_mode=compat -e .
	touch $(STAMP)

setup: $(STAMP)

# GGUF export (the ftstudio[gguf] extra): llama.cpp compiled once per machine (about 5 minutes on 2 cores; the
# wheel is kept under ~/.cache/ftstudio), its converter unpacked into the venv. `make test` needs it; `make demo` does not.
GGUF_STAMP := $(VENV)/.gguf-installed
$(GGUF_STAMP): | $(STAMP)
	@command -v g++ >/dev/null && command -v cmake >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq g++ cmake >/dev/null; }
	$(BIN)/python -m ftstudio.training.gguf setup
	touch $(GGUF_STAMP)

gguf: $(GGUF_STAMP)

# Debian's Chromium for the browser tests (never `playwright install`: it downloads a browser).
browser:
	@test -x /usr/bin/chromium || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

demo: setup
	$(BIN)/ftstudio demo --port $(PORT)

# ruff, the import boundaries between the parts (import-linter) and the types (mypy): settings in pyproject.toml.
lint: setup
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

# The fast tier, between edits: lint, then every test that starts no process, browser or cluster and trains no
# model (the in-memory executor stands in for runners; tests/conftest.py marks the rest). Under 2 minutes on 2 cores.
check: lint
	$(BIN)/python -m pytest -m "not process and not slow" --durations=15

# The Slurm tests run against a real one-node cluster on this machine and its login
# node (an sshd on 127.0.0.1:2222, for --slurm-host), and the multi-node ones against
# an emulated two-node cluster (`up2`: two slurmd in their own network namespaces):
# each is brought up here (root or passwordless sudo, apt) and stopped after pytest,
# whatever pytest says; a cluster that was already up is used and left up, its login
# node started if it was not. Where one cannot come up its tests skip, saying why; in
# CI (CI=true) that fails the run.
test: setup browser gguf lint
	@stop=":"; \
	if $(SLURM_CLUSTER) status >/dev/null 2>&1; then \
	  echo "make test: using the Slurm cluster that is already up"; \
	  $(SLURM_CLUSTER) login-up || echo "make test: its login node did not come up (see above)" >&2; \
	elif $(SLURM_CLUSTER) up; then \
	  stop="$(SLURM_CLUSTER) down; $$stop"; trap "$$stop" EXIT; \
	elif [ "$${CI:-}" = true ]; then \
	  echo "make test: CI needs the Slurm cluster and it did not come up (see above)" >&2; exit 1; \
	else \
	  echo "make test: no Slurm cluster here (see above); the Slurm tests will skip" >&2; \
	fi; \
	if $(SLURM_CLUSTER) status2 >/dev/null 2>&1; then \
	  echo "make test: using the two-node Slurm cluster that is already up"; \
	elif $(SLURM_CLUSTER) up2; then \
	  stop="$(SLURM_CLUSTER) down2; $$stop"; trap "$$stop" EXIT; \
	elif [ "$${CI:-}" = true ]; then \
	  echo "make test: CI needs the two-node Slurm cluster and it did not come up (see above)" >&2; exit 1; \
	else \
	  echo "make test: no two-node Slurm cluster here (see above); the two-node tests will skip" >&2; \
	fi; \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

slurm-up:
	$(SLURM_CLUSTER) up

slurm-down:
	$(SLURM_CLUSTER) down

slurm2-up:
	$(SLURM_CLUSTER) up2

slurm2-down:
	$(SLURM_CLUSTER) down2

bench: setup gguf
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
