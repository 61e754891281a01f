# Two commands do all the set-up: `make repro` (whole pipeline) and `make test` (tests).
PYTHON ?= python3
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install repro test bench ui team-up team-down

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install -e '.[test,team,sweep]'
	touch $@

install: $(VENV)/.installed

repro: install  ## run (or update) the whole DVC pipeline
	dvc repro

test: install  ## unit tests + the end-to-end smoke test on tiny generated data
	python -m pytest

bench: install  ## data-loading and training-throughput benchmarks (needs data/cifar10.npz)
	python bench/load_dataset.py
	python bench/throughput.py
	python bench/mlflow_logging.py

ui: install  ## MLflow UI on http://127.0.0.1:5000
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

team-up: install  ## the team stack: PostgreSQL + SeaweedFS (S3) + mlflow server with auth, on 127.0.0.1
	python -m cifarcnn.teamstack start

team-down:  ## stop every process team-up started
	python -m cifarcnn.teamstack stop
