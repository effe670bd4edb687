# The two commands of the README: `make reproduce` (the study on the offline `default` profile) and `make test`.
# Both create the virtual environment, install the project and fetch the offline data first, idempotently.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROFILE ?= default
# Raw data (the CIFAR-10 / Tiny-ImageNet archives) are looked for in OOD_DATA_ROOT first: ../shared/data by default.
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(origin OOD_DATA_ROOT), undefined)
  ifneq ($(wildcard $(SHARED_DATA)),)
    export OOD_DATA_ROOT := $(SHARED_DATA)
  endif
endif

.PHONY: all venv data browser slurm test reproduce benchmark clean-results
all: test

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

data: venv
	PYTHON=$(PY) bash scripts/fetch_offline_data.sh

# Debian's Chromium and ChromeDriver, for the browser test of the HTML report (tests/test_report.py).
browser:
	bash scripts/install_browser.sh

# Debian's slurm-wlm and munge, for the one-node cluster of the job tests (tests/test_cluster.py).
slurm:
	bash scripts/install_slurm.sh

test: data browser slurm
	$(PY) -m pytest -q

reproduce: data
	$(PY) -m ood_lib.reproduce --profile $(PROFILE)

benchmark: data
	$(PY) benchmarks/speed.py

clean-results:
	rm -rf results/$(PROFILE) figures/$(PROFILE)
