# `make demo` and `make test` work on a fresh machine with only Python 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean gpu-plan-env test-gpu-plan

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[torch,dev,tpu,export]'
	$(PY) -m pip install --quiet --no-deps jax2onnx==0.17.1  # see the export extra in pyproject.toml
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m porting demo
	$(PY) -m train.demo --workdir demo_out/train

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q
	if [ -x $(GPU_PY) ]; then $(MAKE) test-gpu-plan; fi

# GPU planning (`python -m train plan --topology h100:8`): the CUDA compiler plugin, about 5.8 GB,
# in its own environment so that `make test` does not carry it
GPU_VENV := .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_STAMP := $(GPU_VENV)/.installed

$(GPU_STAMP): pyproject.toml
	test -x $(GPU_PY) || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install --quiet --upgrade pip
	$(GPU_PY) -m pip install --quiet -e '.[gpu,dev]'
	touch $(GPU_STAMP)

gpu-plan-env: $(GPU_STAMP)

test-gpu-plan: $(GPU_STAMP)
	$(GPU_PY) -m pytest -q -m slow tests/test_plan.py -k h100

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info
