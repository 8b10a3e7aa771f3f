# isconf.py: make demo (try it), make test (the test suite), make bench (figures).
PYTHON ?= python3
VENV   ?= .venv
PYTEST_REQ = pytest==8.3.4

.PHONY: demo test bench clean

demo:
	$(PYTHON) tests/demo.py

$(VENV)/.ok:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check $(PYTEST_REQ)
	touch $@

test: $(VENV)/.ok
	$(VENV)/bin/python -m pytest -q tests

bench: $(VENV)/.ok
	$(VENV)/bin/python tests/bench.py

clean:
	rm -rf $(VENV) .pytest_cache tests/__pycache__
