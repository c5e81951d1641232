# florist: `make demo` trains and evaluates on flower_photos; `make test` runs the test suite.
# Both create the virtual environment they need (.venv) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Photos to train on: the shared local copy when present, else downloaded (checksum-verified).
DATA ?= $(wildcard ../shared/data/flower_photos)
RUN ?= runs/flowers
PYTEST_ARGS ?=

# Headless browser for the web-page tests: Debian's chromium (Playwright's own browser
# download is never used). Installed when missing and we are root with apt-get; otherwise
# those tests skip locally (and fail under CI).
CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser demo test docs clean

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

browser:
	@if [ ! -x "$(CHROMIUM)" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing chromium (apt-get)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "note: no $(CHROMIUM): the browser tests will skip (apt-get install chromium)"; \
		fi; \
	fi

test: install browser
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

docs: install
	$(VENV)/bin/typer florist.cli utils docs --name florist --output docs/cli.md
	$(PY) docs/mode_defaults.py
