# HomeIot developer entry points. `make help` lists them; README.md explains them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV      := .venv
BIN       := $(VENV)/bin
PY        := $(BIN)/python
PYTHON3   ?= python3
PKG       := homeiot_py
# The venv's tools first (ansible-lint looks up ansible-playbook on PATH).
export PATH := $(CURDIR)/$(BIN):$(PATH)
SUDO      := $(if $(filter 0,$(shell id -u)),,sudo)
APT_PACKAGES := mosquitto mosquitto-clients influxdb docker.io debootstrap curl openssh-client

# Every scenario but `lab` (molecule/lab: `make lab`, a newcomer's running estate, not a test).
MOLECULE_SCENARIOS := $(filter-out lab,$(notdir $(patsubst %/molecule.yml,%,$(wildcard molecule/*/molecule.yml))))

WHEELHOUSE := .cache/wheelhouse
# A DuckDB 1.x CLI, the one a user has: the archive's storage-compatibility test runs the seed's
# `duckdb …` command with it. Kept out of the venv (its own directory, pinned).
DUCKDB_CLI_VERSION := 1.5.6
DUCKDB_CLI_DIR := .cache/duckdb-cli-$(DUCKDB_CLI_VERSION)
DUCKDB_CLI := $(DUCKDB_CLI_DIR)/duckdb_cli/duckdb
PKG_SOURCES := $(shell find $(PKG)/src -type f \( -name '*.py' -o -name '*.json' -o -name 'py.typed' \) 2>/dev/null)

.PHONY: rotate-secret replace-pi help setup setup-apt setup-venv setup-tools setup-docker images wheelhouse test-molecule lint lint-python lint-ansible test test-python bench bench-core bench-gateway bench-archive bench-broute drill-publisher clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: lab lab-images lab-shell lab-status lab-down
lab: export HOMEIOT_LAB_STARTED := $(shell date +%s)
# One after the other: building the images beside the venv + wheelhouse was no quicker on 2 cores
# (222 s side by side against 210 s in turn, nothing cached).
lab: setup-apt setup-venv lab-images wheelhouse ## The home server and a Pi (simulated meter) as local containers, provisioned by site.yml; a live view
	molecule/lab/lab.sh up $(ANSIBLE_ARGS)

lab-shell: ## A shell on a lab host: HOST=server or HOST=pi
	@molecule/lab/lab.sh shell "$(HOST)"

lab-status: ## The lab's containers and a snapshot of its readings
	@molecule/lab/lab.sh status

lab-down: ## Remove the lab: its containers, network, secrets and CA (by the names it chose)
	@molecule/lab/lab.sh down

setup: setup-apt setup-venv setup-tools images ## Install everything the tests need, start dockerd, build images (quick on re-run)

setup-apt: ## Debian packages: real Mosquitto, InfluxDB 1.x, Docker, debootstrap
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "apt: installing$$(echo ' '$$missing)"; \
	    $(SUDO) apt-get update -qq; \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "apt: $(APT_PACKAGES) already installed"; fi

$(VENV)/.stamp: requirements-dev.txt $(PKG)/pyproject.toml
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -e '$(PKG)[server]'
	touch $@

setup-venv: $(VENV)/.stamp ## The control-node venv: pinned tools + homeiot (editable)

$(DUCKDB_CLI): | $(VENV)/.stamp
	rm -rf $(DUCKDB_CLI_DIR).tmp
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps \
	    --target $(DUCKDB_CLI_DIR).tmp duckdb-cli==$(DUCKDB_CLI_VERSION)
	chmod +x $(DUCKDB_CLI_DIR).tmp/duckdb_cli/duckdb
	rm -rf $(DUCKDB_CLI_DIR) && mv $(DUCKDB_CLI_DIR).tmp $(DUCKDB_CLI_DIR)

setup-tools: $(DUCKDB_CLI) ## Test tools outside the venv: a DuckDB 1.x CLI (pinned, in .cache/)

setup-docker: ## Start dockerd when it is not running (Molecule needs it)
	@if ! docker info >/dev/null 2>&1; then \
	    echo "docker: starting dockerd (log: .cache/dockerd.log)"; mkdir -p .cache; \
	    ($(SUDO) dockerd >.cache/dockerd.log 2>&1 &); \
	    for i in $$(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
	fi; \
	docker info >/dev/null 2>&1 || { echo "dockerd did not start: see .cache/dockerd.log"; exit 1; }

images: setup-docker ## Molecule's images, built offline (base images cached in .cache/images)
	molecule/resources/images.sh

lab-images: setup-docker ## The images `make lab` runs (`make images` without the scenarios' LAN client)
	molecule/resources/images.sh lab

# The hosts install homeiot from a wheelhouse only (no PyPI): the homeiot wheel plus every
# dependency at the version the tests ran with (constraints = the venv), downloaded for the
# platform and Python each host runs, never for the control node's own:
#   .cache/wheelhouse/server  homeiot[server] for the server image (debian:bookworm-slim: CPython
#                             3.11; SERVER_ARCH=x86_64, or aarch64 for e.g. a Raspberry Pi 5 server)
#   .cache/wheelhouse/pi      homeiot (the publisher's dependencies only) for the Pi's CPython
#                             (Raspberry Pi OS bookworm: 3.11) and CPU (PI_ARCH: aarch64, armv7l)
# Each role's preflight compares the wheels' tags with its target and stops before copying.
# SOURCE_DATE_EPOCH makes the homeiot wheel byte-identical for identical sources, so a rebuild
# does not make the next converge rebuild the server image or reinstall the Pi's venv.
SERVER_PYTHON ?= 3.11
SERVER_ARCH   ?= x86_64
PI_PYTHON     ?= 3.11
PI_ARCH       ?= aarch64
# manylinux wheels a glibc 2.36 system (bookworm) installs: manylinux_2_17 … manylinux_2_36.
MANYLINUX_GLIBC := $(shell seq 17 36)
wheel_target = --only-binary=:all: --python-version $(1) --implementation cp \
    --abi cp$(subst .,,$(1)) --abi abi3 --abi none \
    $(foreach g,$(MANYLINUX_GLIBC),--platform manylinux_2_$(g)_$(2)) --platform manylinux2014_$(2) \
    --platform linux_$(2)
WHEELHOUSE_STAMP := $(WHEELHOUSE)/.stamp-server-$(SERVER_PYTHON)-$(SERVER_ARCH)-pi-$(PI_PYTHON)-$(PI_ARCH)

$(WHEELHOUSE_STAMP): $(VENV)/.stamp $(PKG_SOURCES)
	rm -rf $(WHEELHOUSE).tmp && mkdir -p $(WHEELHOUSE).tmp/src
	$(PY) -m pip freeze --exclude-editable >$(WHEELHOUSE).tmp/constraints.txt
	SOURCE_DATE_EPOCH=315532800 $(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps \
	    -w $(WHEELHOUSE).tmp/src './$(PKG)'
	$(PY) -m pip download --quiet --disable-pip-version-check -d $(WHEELHOUSE).tmp/server \
	    $(call wheel_target,$(SERVER_PYTHON),$(SERVER_ARCH)) \
	    -c $(WHEELHOUSE).tmp/constraints.txt --find-links $(WHEELHOUSE).tmp/src 'homeiot[server]'
	$(PY) -m pip download --quiet --disable-pip-version-check -d $(WHEELHOUSE).tmp/pi \
	    $(call wheel_target,$(PI_PYTHON),$(PI_ARCH)) \
	    -c $(WHEELHOUSE).tmp/constraints.txt --find-links $(WHEELHOUSE).tmp/src homeiot
	rm -rf $(WHEELHOUSE).tmp/src $(WHEELHOUSE).tmp/constraints.txt
	rm -rf $(WHEELHOUSE) && mv $(WHEELHOUSE).tmp $(WHEELHOUSE) && touch $@
	@for d in server pi; do echo "wheelhouse/$$d: $$(ls $(WHEELHOUSE)/$$d | wc -l) wheels, $$(du -sh $(WHEELHOUSE)/$$d | cut -f1)"; done

wheelhouse: $(WHEELHOUSE_STAMP) ## Wheels for the server image and the Pi (.cache/wheelhouse/{server,pi}); SERVER_ARCH=aarch64 for an arm64 server

lint: lint-python lint-ansible ## ruff, mypy --strict, yamllint, ansible-lint --profile production

# The package, plus the lab's live view (molecule/lab/live.py) under the package's settings.
lint-python: setup-venv
	cd $(PKG) && ../$(BIN)/ruff check . ../molecule/lab/live.py && ../$(BIN)/mypy \
	    && ../$(BIN)/mypy ../molecule/lab/live.py

lint-ansible: setup-venv
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint --profile production
	$(BIN)/ansible-playbook site.yml --syntax-check

test: lint test-python test-molecule ## Lint and every test suite

test-python: setup-venv ## Python unit and integration tests (real Mosquitto and influxd)
	cd $(PKG) && ../$(BIN)/pytest

test-molecule: setup-venv images wheelhouse ## Every Molecule scenario: converge, idempotence, check mode, verify
	@for s in $(MOLECULE_SCENARIOS); do molecule/resources/test-scenario.sh $$s || exit 1; done

bench: bench-core bench-gateway bench-archive ## Every benchmark (prints figures; asserts nothing about time)

bench-core: setup-venv ## Codec and line-protocol throughput against json.loads/dumps
	cd $(PKG) && ../$(BIN)/python -m bench.bench_core

bench-gateway: setup-venv ## Gateway drain rate vs bare paho and mosquitto_sub; p99 latency; RSS
	cd $(PKG) && ../$(BIN)/python -m bench.bench_gateway

bench-broute: setup-venv ## B-route fault detection/recovery times with the production bounds (fake dongle)
	cd $(PKG) && ../$(BIN)/python -m bench.bench_broute

bench-archive: setup-venv ## run_archive vs the raw curl export of one 16-meter 1 Hz day; RSS; 90-day history
	cd $(PKG) && ../$(BIN)/python -m bench.bench_archive

drill-publisher: setup-venv ## 60 s publisher drill: broker down 20 s, one SIGKILL; counts loss
	cd $(PKG) && ../$(BIN)/python -m bench.drill_publisher

INVENTORY ?= inventory/home
ANSIBLE_ARGS ?=
# One machine-made secret rotated in one command: the old value is set aside, site.yml generates
# and deploys a new one everywhere it is used; the old value is deleted once that run succeeded.
rotate-secret: setup-venv ## Rotate a machine-made secret: SECRET=<file under inventory/home/secrets> [ANSIBLE_ARGS=--ask-vault-pass]
	@test -n "$(SECRET)" || { echo "usage: make rotate-secret SECRET=<name>; one of: $$(ls $(INVENTORY)/secrets 2>/dev/null | grep -v '\.previous$$' | tr '\n' ' ')" >&2; exit 2; }
	@case "$(SECRET)" in */*|.*) echo "SECRET is a file name under $(INVENTORY)/secrets" >&2; exit 2;; esac
	@test -f "$(INVENTORY)/secrets/$(SECRET)" || { echo "no machine-made secret '$(SECRET)' in $(INVENTORY)/secrets" >&2; exit 2; }
	@case "$(SECRET)" in influxdb-admin-token|grafana-admin) echo "$(SECRET): its service keeps the value it was given at first start (InfluxDB 2.x makes token values itself; Grafana stores its admin password), so a new value here would not be applied. Rotate it inside the service: roles/influxdb/README.md or roles/grafana/README.md" >&2; exit 2;; esac
	mv "$(INVENTORY)/secrets/$(SECRET)" "$(INVENTORY)/secrets/$(SECRET).previous"
	$(BIN)/ansible-playbook -i $(INVENTORY)/hosts.yml site.yml $(ANSIBLE_ARGS) || { \
	    echo "site.yml failed: the new $(SECRET) may be deployed on some hosts only; fix the cause and re-run" \
	         "ansible-playbook site.yml (the previous value is in $(INVENTORY)/secrets/$(SECRET).previous)" >&2; exit 1; }
	rm -f "$(INVENTORY)/secrets/$(SECRET).previous"
	@echo "rotated $(SECRET): site.yml deployed the new value"

replace-pi: setup-venv ## Replace a Raspberry Pi in one command: PI=<inventory name> [ANSIBLE_ARGS=--ask-vault-pass]
	@test -n "$(PI)" || { echo "usage: make replace-pi PI=<name>; one of: $$($(BIN)/ansible-inventory -i $(INVENTORY)/hosts.yml --graph raspi 2>/dev/null | sed -n 's/^.*--//p' | tr '\n' ' ')" >&2; exit 2; }
	$(BIN)/ansible-playbook -i $(INVENTORY)/hosts.yml playbooks/replace-pi.yml --limit '$(PI),homeserver' $(ANSIBLE_ARGS)

clean: ## Remove caches (keeps .venv)
	rm -rf .cache $(PKG)/.pytest_cache $(PKG)/.mypy_cache $(PKG)/.ruff_cache $(PKG)/.hypothesis
