# The few verbs people type. Everything runs inside .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
# The notebook's public object; the shared local copy when this checkout has one (offline machines).
CORPUS_URI ?= $(if $(wildcard ../shared/data/nietzsche.txt),../shared/data/nietzsche.txt,s3://text-datasets/nietzsche.txt)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test lint bench bench-gpu gpu-pack clean

$(PY):
	python3 -m venv $(VENV)

setup: $(PY)  ## create .venv, install torch for this host, then the project
	PIP="$(PY) -m pip" scripts/install-torch.sh
	$(PY) -m pip install -q -e ".[pipeline,dev]"

# Every architecture on one task (lowercased, min_freq 3: the stateful models' notebook settings), so the
# comparison ranks them all; TASK= (empty) keeps each preset's own, which the comparison ranks apart.
TASK ?= --set data.lowercase=true --set data.min_freq=3

run: setup  ## the main job: the Prefect pipeline on the embedded defaults (ephemeral Prefect, local MLflow)
	$(PY) -m flows.pipeline --corpus-uri $(CORPUS_URI) $(TASK) $(ARGS)

# Two pytest workers, each taking whole files (a file's module-scoped services start once, and its
# tests keep their order): most tests wait on subprocesses and servers, so two workers finish the
# suite on 2 cores in about 0.6 of one's time. TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2

test: setup  ## the whole test suite
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

lint: setup  ## ruff (lint + format) and mypy --strict on charlm/
	$(VENV)/bin/ruff check charlm flows tests bench
	$(VENV)/bin/ruff format --check charlm flows tests bench
	$(VENV)/bin/mypy

bench:
	$(PY) bench/throughput.py
	$(PY) bench/quality.py
	$(PY) bench/pipeline_overhead.py
	$(PY) bench/ddp_scaling.py
	$(PY) bench/snapshots.py
	$(PY) bench/time_to_quality.py
	$(PY) bench/precision.py
	$(PY) bench/step_costs.py

bench-gpu:  ## the GPU figures (one GPU, under 5 minutes)
	PY=$(PY) bench/gpu_check.sh

gpu-pack:  ## pack the wheels and corpus a GPU machine without network lacks into .gpu/ (bench/gpu_wheelhouse.py)
	$(PY) bench/gpu_wheelhouse.py

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .charlm .pytest_cache
