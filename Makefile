# The two commands: `make demo` (lab up, converge, show a job done) and `make test` (lint + every test).
# Both run on a fresh Debian 12 machine as root; they install what they need from this repository's files.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
# Debian's Python, not whatever python3 is first on PATH (pyenv, conda, a venv): ansible-core 2.19 and
# pystemd's build are checked against it. 3.11 is bookworm's.
PYTHON := /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
LAB := tools/lab/lab
STAMPS := build
# The venv's stamp lives inside the venv: deleting .venv makes the next make build it again.
VENV_STAMP := $(VENV)/.installed
# Two test modules at a time, the longest first (tests/conftest.py orders them; xdist keeps that order only
# with --no-loadscope-reorder). PYTEST_ARGS= runs them one after another (README: Tests and CI).
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: help deps venv wheel circus-wheels promtool lab demo test lint pytest molecule clean distclean bench-cli bench-ops bench-fleet bench-gearmand
help:
	@echo "make demo       boot the lab, converge it (playbooks/lab/site.yml), show the workers and a completed job"
	@echo "make test       lint, pytest (stand-in, lab, roles, CLI, the Molecule scenarios)"
	@echo "make lab        boot the lab only"
	@echo "make clean      remove every lab host;  make distclean  also the venv, build/ and the lab's golden image"

$(STAMPS)/apt: apt-packages.txt
	@mkdir -p $(STAMPS)
	@echo "== installing Debian packages for the control host (apt-packages.txt)"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$(grep -v '^#' apt-packages.txt) >/dev/null
	@touch $@

# --clear below: a venv made by another Python (pyenv, an older Debian) is rebuilt, not patched over.
$(VENV_STAMP): requirements.txt pyproject.toml $(STAMPS)/apt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "$(PYTHON) is $$($(PYTHON) -V 2>&1); this needs Python 3.11 or newer (Debian 12)" >&2; exit 1; }
	@echo "== creating the Python venv ($(VENV)): ansible-core, lint, pytest, molecule, pystemd (builds ~1 min)"
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

# The CLI as a wheel in build/wheel/: the atom_workerctl role's default copies it to the hosts (pinned by
# version and sha256; lab hosts and production hosts alike).
$(STAMPS)/wheel.stamp: $(VENV_STAMP) $(wildcard tools/atom_workerctl/*.py) pyproject.toml
	rm -rf $(STAMPS)/wheel && mkdir -p $(STAMPS)/wheel
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w $(STAMPS)/wheel .
	@touch $@

# circus for hosts without a package index (lab hosts): the wheels of the atom_worker role's pins
# (atom_worker_circus_requirements, read from its defaults) for Debian 12's Python on x86_64, in
# build/circus-wheels; `atom_worker_circus_wheels_dir` points the role at them (tests/circus, Molecule's circus).
CIRCUS_WHEELS := $(STAMPS)/circus-wheels
CIRCUS_PLATFORM ?= manylinux2014_x86_64
CIRCUS_PYTHON ?= 3.11
$(STAMPS)/circus-wheels.stamp: $(VENV_STAMP) roles/atom_worker/defaults/main.yml
	rm -rf $(CIRCUS_WHEELS) && mkdir -p $(CIRCUS_WHEELS)
	$(BIN)/pip download -q --disable-pip-version-check --only-binary=:all: --platform $(CIRCUS_PLATFORM) \
	  --python-version $(CIRCUS_PYTHON) --implementation cp -d $(CIRCUS_WHEELS) \
	  $$($(BIN)/python -c 'import yaml; print(" ".join(yaml.safe_load(open("roles/atom_worker/defaults/main.yml"))["atom_worker_circus_requirements"]))')
	@touch $@

# promtool (tests/test_monitoring.py checks and unit-tests monitoring/'s alert rules with it) from Debian's
# prometheus package, unpacked into build/prometheus, not installed: the package would start a Prometheus
# server on this machine. apt-get download needs the package lists, which the apt stamp's update fetched;
# it downloads as root (APT::Sandbox::User): apt's own _apt user may not reach the checkout (apt warns).
$(STAMPS)/promtool.stamp: $(STAMPS)/apt
	rm -rf $(STAMPS)/prometheus $(STAMPS)/prometheus_*.deb
	cd $(STAMPS) && apt-get download -qq -o APT::Sandbox::User=root prometheus
	dpkg-deb -x $(STAMPS)/prometheus_*.deb $(STAMPS)/prometheus
	$(STAMPS)/prometheus/usr/bin/promtool --version >/dev/null
	@touch $@

deps: $(STAMPS)/apt
venv: $(VENV_STAMP)
promtool: $(STAMPS)/promtool.stamp

wheel: $(STAMPS)/wheel.stamp
circus-wheels: $(STAMPS)/circus-wheels.stamp

lab: venv wheel
	@echo "== booting the lab (builds the golden image the first time: about a minute)"
	$(LAB) up

demo: lab
	@echo "== converging the lab with playbooks/lab/site.yml (the AtoM stand-in, then site.yml)"
	$(LAB) exec -- $(BIN)/ansible-playbook playbooks/lab/site.yml
	@echo "== the workers, a job submitted and completed"
	$(LAB) exec -- $(BIN)/python tools/demo_status.py

lint: venv
	@echo "== lint: yamllint, ansible-lint (production profile), ruff"
	$(BIN)/yamllint --strict .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ansible-lint --offline -q
	$(BIN)/ruff check .

pytest: venv wheel circus-wheels promtool
	$(LAB) exec -- $(BIN)/pytest $(PYTEST_ARGS)

molecule: venv wheel circus-wheels
	@for scenario in $$(ls molecule); do \
	  echo "== molecule test -s $$scenario"; \
	  $(LAB) exec -- env PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/molecule test -s $$scenario; \
	done

# The Molecule scenarios run inside pytest (tests/molecule), beside the other lab modules; `make molecule`
# runs them alone.
test: lint pytest

# Every lab host (other checkouts' too: the lab is one per machine).
clean:
	-$(LAB) down

# Also what the first `make demo` built: the venv, build/ (stamps, the wheel) and the lab's golden image
# (tools/lab keeps it in /var/lib/atom-lab/golden-<hash>; no host boots from it once `lab down` ran).
distclean: clean
	rm -rf $(VENV) $(STAMPS) atom_workerctl.egg-info
	rm -rf /var/lib/atom-lab/golden-*

bench-cli: venv wheel
	$(LAB) exec -- $(BIN)/python bench/cli/bench.py

bench-ops: venv wheel
	$(LAB) exec -- $(BIN)/python bench/ops/run.py

bench-fleet: venv wheel
	$(LAB) exec -- $(BIN)/python bench/fleet/run.py

bench-gearmand: venv wheel
	$(LAB) exec -- $(BIN)/python bench/gearmand/run.py
