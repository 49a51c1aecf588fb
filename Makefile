# The two commands a fresh clone needs:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test ui bench clean-data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## Generate demo data and materialize the whole asset graph end to end (embedded defaults under data/).
demo: $(STAMP)
	$(BIN)/ml-platform demo $(ARGS)

## The whole test suite (real MLflow/DuckDB in temp dirs; Redis on 127.0.0.1:6379 or REDIS_URL).
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

## The Dagster web UI on http://127.0.0.1:3000 (DAGSTER_HOME under data/).
ui: $(STAMP)
	$(BIN)/ml-platform ui $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/pit_join.py $(ARGS)

clean-data:
	find data -mindepth 1 ! -name .gitkeep -delete
