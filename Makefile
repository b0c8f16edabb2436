# The two README commands. Each creates .venv and installs what it needs the first time.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c .ci/constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c .ci/constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/aim-ray demo

test: $(STAMP)
	$(BIN)/ruff check aim_ray tests benchmarks
	$(BIN)/python -m pytest -q -x -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check aim_ray tests benchmarks
