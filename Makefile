# The two commands a fresh clone needs:  `make demo`  and  `make test`.
PYTHON ?= python3
# The suite on two pytest-xdist workers, a test module each at a time (`PARALLEL=` runs it in one process).
PARALLEL ?= -n 2 --dist loadfile
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test test-production ui bench clean-data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## Generate demo data and materialize the whole asset graph end to end (embedded defaults under data/).
demo: $(STAMP)
	$(BIN)/ml-platform demo $(ARGS)

## The whole test suite (real MLflow/DuckDB in temp dirs; Redis on 127.0.0.1:6379 or REDIS_URL), then
## the integration tests again in the production profile (PostgreSQL on 127.0.0.1:5432, an MLflow
## server, Redis ACL users). With ARGS (e.g. ARGS=ml_platform_tests/test_api.py) only pytest $(ARGS).
test: $(STAMP)
	$(BIN)/python -m pytest $(PARALLEL) $(ARGS)
ifeq ($(strip $(ARGS)),)
	$(MAKE) --no-print-directory test-production
endif

## The integration tests (marker `integration`) in the production profile.
test-production: $(STAMP)
	ML_PLATFORM_TEST_PROFILE=production $(BIN)/python -m pytest $(PARALLEL) -m integration $(PROD_ARGS)

## The Dagster web UI on http://127.0.0.1:3000 (DAGSTER_HOME under data/).
ui: $(STAMP)
	$(BIN)/ml-platform ui $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/pit_join.py $(ARGS)

clean-data:
	find data -mindepth 1 ! -name .gitkeep -delete
