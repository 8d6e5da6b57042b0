# The two commands of the README. Each bootstraps .venv on a fresh machine (torch first, so that nothing
# drags in a CUDA build), then runs its job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.apbench-installed

.PHONY: demo test lint format clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bench evaluate --method hydra --sparsity 0.95

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check bench methods leaderboard tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format bench methods leaderboard tests benchmarks
	$(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
