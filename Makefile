# The two commands of the README. Each bootstraps .venv on a fresh machine (torch first, so that nothing
# drags in a CUDA build), then runs its job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# The CPU build's index: pip prefers its 2.13.0+cpu over PyPI's CUDA build of the same version. Where the index
# cannot be reached (an offline mirror with a local +cpu wheel), pip retries a few seconds and goes on.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.apbench-installed

.PHONY: demo test lint format clean-venv chromium postgres

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) --extra-index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bench evaluate --method hydra --sparsity 0.95
	$(BIN)/bench leaderboard build --out site

# The browser test drives Debian's chromium through playwright (never playwright's own browser download).
chromium:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the browser test (apt-get)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium; tests/leaderboard/test_browser.py will be skipped (see its reason)"; \
	fi

# The store's tests also run on a real PostgreSQL server that they start themselves in a temporary folder
# (tests/pg_cluster.py); they need the server's programs, initdb and postgres. Without them those tests fail
# with the reason, unless APBENCH_NO_POSTGRES=1 is set.
postgres:
	@if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		&& command -v apt-get >/dev/null 2>&1; then \
		echo "installing the PostgreSQL server for the store tests (apt-get)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
		|| echo "warning: could not install postgresql; the PostgreSQL store tests will fail (see their reason)"; \
	fi

test: $(STAMP) chromium postgres
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -rs

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check bench methods leaderboard tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format bench methods leaderboard tests benchmarks
	$(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
