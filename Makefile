# Two commands do all the set-up: `make course` and `make test`.
# GPU users: `make course TORCH="torch --index-url https://download.pytorch.org/whl/cu121"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PRESET ?= course
OUT ?= runs/course
NOTEBOOKS ?=
PY := $(VENV)/bin/python

.PHONY: course test venv clean-venv smoke benchmark benchmark-train lab assignments

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so pip never resolves a second (CUDA) build for the project
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[course,dev]"
	touch $@

venv: $(VENV)/.installed

course: venv
	$(PY) -m itmkit.course run $(NOTEBOOKS) --preset $(PRESET) --out $(OUT)

# Open the course in JupyterLab (the jupyterlab package comes with the course extra).
# LAB_ARGS passes options through, e.g. LAB_ARGS="--no-browser --port 8890"; as root (containers)
# JupyterLab refuses to start without --allow-root, so it is added there.
LAB_ARGS ?=
lab: venv
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# Classroom assignments (nbgrader): the release versions (solutions stripped) in
# assignments/release/ and the exercise table of the teacher's guide, docs/teaching.md.
assignments: venv
	$(PY) -m itmkit.assignments release

smoke:
	$(MAKE) course PRESET=smoke OUT=runs/smoke

test: venv
	$(PY) -m pytest -q -ra

benchmark: venv
	$(PY) benchmarks/pairwise_engine.py

# Training throughput per method (pairs/s against the data-loading limit; JSON in runs/benchmarks/)
benchmark-train: venv
	$(PY) benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)
