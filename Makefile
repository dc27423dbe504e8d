# normport: `make export` (main job) and `make test` need nothing installed beforehand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Benchmarks pin threads; override with `make bench THREADS=2`.
THREADS ?= 1

.PHONY: install test export serve verify bench lint format clean

install: $(STAMP)

# Re-runs only when the dependency set changes: a second `make install` does nothing.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Two workers for the two cores; a file's tests stay on one worker (their exports are cached).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

export: $(STAMP)
	$(PY) -m export --all --out model_repository

bench: $(STAMP)
	$(PY) -m benchmarks.layers --threads $(THREADS) --out reports/bench/layers.json
	$(PY) -m benchmarks.export --threads $(THREADS) --out reports/bench/export.json
	$(PY) -m benchmarks.serve --out reports/bench/serve.json
	$(PY) -m benchmarks.kserve --out reports/bench/kserve.json
	$(PY) -m benchmarks.soak --threads $(THREADS) --out reports/bench/soak.json
	$(PY) -m benchmarks.export_time --out reports/bench/export_time.json
	$(PY) -m benchmarks.startup --out reports/bench/startup.json

# Serves model_repository/ on 127.0.0.1:8000, exporting it first when it is missing.
serve: $(STAMP)
	test -d model_repository || $(MAKE) export
	$(PY) -m runtime serve --repository model_repository --host 127.0.0.1 --port 8000

verify: $(STAMP)
	$(PY) -m runtime verify --all --out reports/verify

# mypy on the public, torch-free modules; .typecheck/normport/ links let it resolve normport.*.
TYPECHECKED := -m normport.export.triton_config -m normport.export.train_graph \
	-m normport.export.repository -m normport.export.about -m normport.runtime.sessions \
	-m normport.runtime.messages \
	-p normport.runtime.serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	mkdir -p .typecheck/normport
	for d in models export runtime; do ln -sfn ../../$$d .typecheck/normport/$$d; done
	$(VENV)/bin/mypy $(TYPECHECKED)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) reports model_repository .pytest_cache .ruff_cache .mypy_cache .typecheck
