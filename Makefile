# florist: `make demo` trains and evaluates on flower_photos; `make test` runs the test suite.
# Both create the virtual environment they need (.venv) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Photos to train on: the shared local copy when present, else downloaded (checksum-verified).
DATA ?= $(wildcard ../shared/data/flower_photos)
RUN ?= runs/flowers
PYTEST_ARGS ?=

.PHONY: install demo test docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: install
	@data="$(DATA)"; \
	if [ -z "$$data" ]; then data=$$($(VENV)/bin/florist download --quiet) || exit $$?; fi; \
	echo "training on $$data"; \
	$(VENV)/bin/florist train "$$data" --out $(RUN) --overwrite && \
	$(VENV)/bin/florist predict $(RUN) "$$data/roses" --top-k 1 --csv | head -4

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

docs: install
	$(VENV)/bin/typer florist.cli utils docs --name florist --output docs/cli.md
