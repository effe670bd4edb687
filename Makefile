# The two commands of the README: `make reproduce` (the study on the offline `default` profile) and `make test`.
# Both create the virtual environment, install the project and fetch the offline data first, idempotently.
# `make lab` opens the notebooks in JupyterLab on the same environment.
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

.PHONY: all venv data browser slurm test reproduce lab lock benchmark clean-results
all: test

# The exact versions of requirements.lock (what the tests ran with), then the project, editable. The check fails
# when requirements.txt asks for something the lock does not pin: `make lock` rewrites it from the venv.
$(VENV)/.installed: requirements.lock requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) scripts/lock_requirements.py --check
	touch $@

# requirements.lock from the venv: install what requirements.txt asks for and the venv lacks, then pin the venv.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) scripts/lock_requirements.py

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

# JupyterLab on notebooks/, run from the venv. The notebooks' kernelspec `python3` is the venv's own (the first
# Jupyter data path of the venv's jupyter is .venv/share/jupyter), so their kernels run the venv's Python; the kernel
# `ood-study` is registered into the venv too (--sys-prefix: nothing under ~). Kernel channels are CurveZMQ-encrypted
# where pyzmq supports it. Extra options: make lab LAB_ARGS="--no-browser --port 8890".
LAB_ARGS ?=
lab: data
	$(PY) -m ipykernel install --sys-prefix --name ood-study --display-name "Python 3 (ood-study, .venv)"
	$(PY) -m jupyterlab --ServerApp.root_dir="$(CURDIR)/notebooks" \
	  --MappingKernelManager.transport_encryption=$$($(PY) -c 'import zmq; print("auto" if zmq.has("curve") else "disabled")') \
	  $$(test "$$(id -u)" = 0 && echo --allow-root) $(LAB_ARGS)

benchmark: data
	$(PY) benchmarks/speed.py

clean-results:
	rm -rf results/$(PROFILE) figures/$(PROFILE)
