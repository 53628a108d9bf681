# Every target creates what it needs: the virtual environment, the packages,
# and (for tests, demo and benchmarks) a PostgreSQL server.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install demo test test-unit lint format stamp bench bench-quick soak clean snapshot

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/pyqueue demo

lint: install
	$(BIN)/sqlfluff lint sql/
	$(BIN)/ruff check pyqueue tests examples bench
	$(BIN)/ruff format --check pyqueue tests examples bench
	$(BIN)/mypy
	$(BIN)/mypy --strict examples

format: install
	$(BIN)/ruff format pyqueue tests examples bench
	$(BIN)/ruff check --fix pyqueue tests examples bench

# Rewrites the checksum each sql/ file records for itself (after editing one).
stamp: install
	$(BIN)/python -c "from pathlib import Path; from pyqueue import migrations; \
	  print(*migrations.stamp(Path('sql')), sep='\n')"

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# Benchmarks on a throwaway server with default durability (fsync on): W1-W5
# and the pgbench ceiling, figures with their spread, JSON in bench-results.json.
# bench takes about 5 minutes on 2 cores, bench-quick about one;
# e.g. BENCH_ARGS="--only w1,ceiling --repeats 1".
bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python bench/run.py --quick $(BENCH_ARGS)

# Not part of `make test`: 100,000 jobs over 50 queues while worker processes
# are killed and the server restarts once; prints what was lost (must be 0).
# About a minute on 2 cores (45 s measured); e.g. SOAK_ARGS="--jobs 10000" for a quick one.
soak: install
	$(BIN)/python soak/run.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# Rewrites tests/db/catalog_snapshot.txt from an empty database migrated with
# sql/ (after changing a migration); review its diff with the sql/ diff.
snapshot: install
	$(BIN)/python tests/db/catalog_dump.py
