# Two commands on a fresh machine:  make train  (default recipe end to end)  /  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: env train test clean

$(VENV)/.installed: requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

env: $(VENV)/.installed

# The default recipe: the tiny hybrid lightning/softmax MoE on the embedded corpus, on CPU.
train: env
	$(VENV)/bin/mmtrain train $(ARGS)

test: env
	$(PY) -m pytest tests -q --timeout=900 $(ARGS)

clean:
	rm -rf $(VENV) runs
