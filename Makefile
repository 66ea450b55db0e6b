# `make demo` and `make test` work on a fresh machine with only Python 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[torch,dev,tpu]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m porting demo
	$(PY) -m train.demo --workdir demo_out/train

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) build *.egg-info
