# Two commands set up a fresh machine and do the work:
#   make run    # virtualenv + pinned deps, then the default DAG on the embedded model (snakemake)
#   make test   # virtualenv + pinned deps, then the test suite (what .ci/run calls)
# Both are idempotent: setup reruns only when pyproject.toml or requirements.lock change.
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
CORES      ?= 2
SNAKEMAKE_ARGS ?= --show-failed-logs   # a failed job prints its log, not only "check log file(s)"
PYTEST_ARGS ?=
# test files are spread over this many pytest-xdist workers (whole files, heaviest first: tests/conftest.py);
# 0 runs them in this process
PYTEST_WORKERS ?= $(CORES)
XDIST      := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: setup run smoke test test-fast lint report screenshot clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	@echo "==> setup: virtualenv $(VENV) with $(TORCH_SPEC) and requirements.lock"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@
	@echo "==> setup done"

run: setup
	@echo "==> snakemake --cores $(CORES): the default DAG on the embedded model (results/default/)"
	$(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)

smoke: setup
	$(BIN)/snakemake --cores $(CORES) --configfile conf/sweep/smoke.yaml $(SNAKEMAKE_ARGS)

report: setup
	$(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS) --report report.html

screenshot: report
	$(BIN)/python workflow/scripts/screenshot_report.py report.html --out report_screenshots --view all

test: setup
	@echo "==> pytest on $(PYTEST_WORKERS) workers (CPU; Triton kernels under TRITON_INTERPRET=1)"
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not slurm" $(PYTEST_ARGS)

lint: setup
	$(BIN)/snakemake --lint
	$(BIN)/snakemake -n --quiet

clean:
	rm -rf results outputs multirun .snakemake
