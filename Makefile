# Two entry points, both from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test completions venv

# Debian's python3 has no venv module until python3-venv is installed; as root, install it.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); \
	  else echo "python3 -m venv failed: install your distribution's python3-venv package" >&2; exit 1; fi; }
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(BIN)/python

demo: venv
	$(BIN)/pip install -q .
	$(BIN)/python bench/photos.py demo/photos --count 8
	$(BIN)/thumbcli generate demo/photos -o demo/thumbs -s 128 -s 256 -s 512
	@echo "thumbnails are in demo/thumbs/ (one folder per size):" && find demo/thumbs -name '*.jpg' | sort | head -n 24

test: venv
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/ruff check thumbcli tests bench
	$(BIN)/ruff format --check thumbcli tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

completions: venv
	$(BIN)/pip install -q -e .
	for shell in bash zsh fish; do \
	  _THUMBCLI_COMPLETE=$${shell}_source $(BIN)/thumbcli > completions/thumbcli.$$shell; done
