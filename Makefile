# The two commands: `make demo` (lab up, converge, show a job done) and `make test` (lint + every test).
# Both run on a fresh Debian 12 machine as root; they install what they need from this repository's files.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
BIN := $(VENV)/bin
LAB := tools/lab/lab
STAMPS := build
# One module after another. PYTEST_ARGS="-n 2 --dist loadfile" runs two at a time (README: Tests and CI).
PYTEST_ARGS ?=

.PHONY: help deps venv wheel lab demo test lint pytest molecule clean bench-cli bench-ops bench-fleet
help:
	@echo "make demo   boot the lab, converge it with site.yml, show the workers and a completed job"
	@echo "make test   lint, pytest (stand-in, lab, roles, CLI), Molecule"
	@echo "make lab    boot the lab only;  make clean  remove every lab host"

$(STAMPS)/apt: apt-packages.txt
	@mkdir -p $(STAMPS)
	@echo "== installing Debian packages for the control host (apt-packages.txt)"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$(grep -v '^#' apt-packages.txt) >/dev/null
	@touch $@

$(STAMPS)/venv: requirements.txt pyproject.toml $(STAMPS)/apt
	@echo "== creating the Python venv ($(VENV)): ansible-core, lint, pytest, molecule, pystemd (builds ~1 min)"
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

# The CLI as a wheel, for lab hosts (they have no PyPI; the lab inventory points atom_workerctl at it).
$(STAMPS)/wheel.stamp: $(STAMPS)/venv $(wildcard tools/atom_workerctl/*.py) pyproject.toml
	rm -rf $(STAMPS)/wheel && mkdir -p $(STAMPS)/wheel
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w $(STAMPS)/wheel .
	@touch $@

deps: $(STAMPS)/apt
venv: $(STAMPS)/venv

wheel: $(STAMPS)/wheel.stamp

lab: venv wheel
	@echo "== booting the lab (builds the golden image the first time: about a minute)"
	$(LAB) up

demo: lab
	@echo "== converging the lab with site.yml"
	$(LAB) exec -- $(BIN)/ansible-playbook site.yml
	@echo "== the workers, a job submitted and completed"
	$(LAB) exec -- $(BIN)/python tools/demo_status.py

lint: venv
	@echo "== lint: yamllint, ansible-lint (production profile), ruff"
	$(BIN)/yamllint --strict .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ansible-lint --offline -q
	$(BIN)/ruff check .

pytest: venv wheel
	$(LAB) exec -- $(BIN)/pytest $(PYTEST_ARGS)

molecule: venv wheel
	@for scenario in $$(ls molecule); do \
	  echo "== molecule test -s $$scenario"; \
	  $(LAB) exec -- env PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/molecule test -s $$scenario; \
	done

test: lint pytest molecule

clean:
	-$(LAB) down

bench-cli: venv wheel
	$(LAB) exec -- $(BIN)/python bench/cli/bench.py

bench-ops: venv wheel
	$(LAB) exec -- $(BIN)/python bench/ops/run.py

bench-fleet: venv wheel
	$(LAB) exec -- $(BIN)/python bench/fleet/run.py
