# Thin aliases; configuration lives in pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo

.PHONY: install test test-all demo lint docs docs-serve bench bench-stats fuzz clean

# torch and torchvision are pinned so a fresh machine takes the local wheels, not a multi-GB download.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(STAMP)

# two workers (the machine's two cores), one torch thread each: the tests' tensors are small, and two threads
# per worker on two cores cost far more than they give
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2

# everything, the tests marked heavy too (a full VGG16 with its top in Keras, torchrun's several processes)
test-all: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m ""

demo: install
	bash scripts/demo.sh $(DEMO)

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(MAKE) docs

# the docs site (mkdocs.yml, docs/) into site/; --strict: a broken link, anchor or reference is an error.
# PYTHONPATH: the CLI and API reference are generated from this checkout's code.
docs: install
	PYTHONPATH=src NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs-serve: install
	PYTHONPATH=src NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# random ReLU-CNN graphs checked against the tests' own oracle; prints "N exact, M refused (by reason: ...)"
fuzz: install
	VGGNORM_FUZZ_EXAMPLES=3000 $(BIN)/python -m pytest -q -s tests/test_generator.py

# every command against its floor (a table, bench/results/COMMIT.json, docs/benchmarks.md); compute-stats' own
# floors (decode, forward, statistics) in detail: make bench-stats
bench: install
	$(BIN)/python scripts/bench_commands.py

bench-stats: install
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) $(DEMO) bench site
