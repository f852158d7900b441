# The few verbs people type. Everything runs inside .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
CORPUS ?= ../shared/data/nietzsche.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test lint bench clean

$(PY):
	python3 -m venv $(VENV)

setup: $(PY)  ## create .venv, install torch for this host, then the project
	PIP="$(PY) -m pip" scripts/install-torch.sh
	$(PY) -m pip install -q -e ".[pipeline,dev]"

run: setup  ## the main job: train stateful_gru with the notebook's settings
	$(VENV)/bin/charlm train --arch stateful_gru --corpus $(CORPUS) --out runs/stateful_gru $(ARGS)

test: setup  ## the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check charlm flows tests bench
	$(VENV)/bin/ruff format --check charlm flows tests bench

bench:
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache
