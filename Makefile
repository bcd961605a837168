# Two commands on a fresh machine:  make train  (default recipe end to end)  /  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: env slurm train test clean

$(VENV)/.installed: requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

env: $(VENV)/.installed

# The default recipe: the tiny hybrid lightning/softmax MoE on the embedded corpus, on CPU.
train: env
	$(VENV)/bin/mmtrain train $(ARGS)

# The Slurm launch test needs Debian's slurm packages; install them when we can (root + apt).
slurm:
	@command -v slurmctld >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  slurmctld slurmd slurm-client munge >/dev/null; } || echo "note: Slurm not installed; its test is skipped"

test: env slurm
	$(PY) -m pytest tests -q --timeout=900 $(ARGS)

clean:
	rm -rf $(VENV) runs
