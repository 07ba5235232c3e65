# sleep2vec: the two commands a newcomer runs are `make demo` and `make test`.
# Both create .venv, install the pinned CPU torch first (a plain `torch`
# requirement would pull a multi-GB CUDA build), then the package.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
WORKDIR ?= demo-workdir
BIN := $(VENV)/bin

.PHONY: install demo lint test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/s2v demo --workdir $(WORKDIR)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Three stages, all in CI: lint and format, the fast suite (a broken build fails
# in about a minute), then the integration runs (real Ray cluster, DeepSpeed, MLflow).
test: lint
	$(BIN)/python -m pytest tests -m "not integration"
	$(BIN)/python -m pytest tests -m integration

test-fast: install
	$(BIN)/python -m pytest tests -m "not integration"

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
