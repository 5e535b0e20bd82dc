# Two commands for a newcomer: `make demo` (the main job on a built-in dataset) and `make test`.
# Both create or reuse the virtual environment in .venv and install everything into it.
# On a machine with a CUDA GPU, install without the CPU pins: `make install CONSTRAINTS=`.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.medsclean-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-all demo bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

demo: $(STAMP)
	$(BIN)/medsclean demo

clean:
	rm -rf medsclean-work .pytest_cache
