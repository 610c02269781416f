# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates or reuses .venv and installs the package with what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STAMP_DEV := $(VENV)/.installed-dev
DEMO_OUT ?= outputs/demo

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(STAMP_DEV): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP_DEV)

venv: $(STAMP)

# The main job: text to image with the embedded default model (inference/default_model), on the CPU, in seconds.
demo: $(STAMP)
	$(VENV)/bin/ldm txt2img "a red circle" "a green triangle above a yellow circle" \
	    "a small blue square on the left" "a large purple diamond on the right" \
	    --n 4 --cfg 5 --seed 0 --batch 16 --grid --grid-scale 4 --out $(DEMO_OUT)

test: $(STAMP_DEV)
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) build *.egg-info
