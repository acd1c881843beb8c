# ambient-cni — build, test, demo. Everything runs as root on a Debian 12 machine.
SHELL := /bin/bash
PY_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DIST := dist
PLUGIN := $(DIST)/ambient-cni
CNITOOL := tests/tools/bin/cnitool
PYTEST_ARGS ?=

.PHONY: all deps venv build driver test lint typecheck demo bench bench-readme clean

all: build

deps: .deps.stamp
.deps.stamp: scripts/install-deps.sh
	./scripts/install-deps.sh
	touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: requirements.txt .deps.stamp
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	touch $@

# Generated from the pydantic models (the hot path never imports pydantic's model layer).
GENERATED := cni_plugin/_generated_schema.py
$(GENERATED): cni_plugin/config.py cni_plugin/schema_gen.py cni_plugin/minischema.py $(VENV)/.stamp
	$(PY) -m cni_plugin.schema_gen > $@.tmp && mv $@.tmp $@

PY_SOURCES := $(shell find cni_plugin cli_options conflist nodeagent ambient_cni zds netns_threads zds_peer -name '*.py' 2>/dev/null)
build: $(PLUGIN)
$(PLUGIN): $(VENV)/.stamp $(GENERATED) build/pyinstaller.spec build/plugin_entry.py build/lazy_rthooks.py $(PY_SOURCES)
	$(VENV)/bin/pyinstaller --noconfirm --log-level WARN --workpath .pyi-work --distpath $(DIST) build/pyinstaller.spec
	ln -sfn ambient-cni.bundle/ambient-cni $(PLUGIN)
	touch $(PLUGIN)

driver: $(CNITOOL)
$(CNITOOL): tests/tools/cnitool/main.go .deps.stamp
	mkdir -p $(dir $@)
	cd tests/tools/cnitool && GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS=-mod=mod go build -o ../bin/cnitool .

lint: $(VENV)/.stamp $(GENERATED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: deps build driver lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: deps build driver
	$(PY) -m demo

# Prints every row (missed targets marked); fails only on a broken run; a full run writes docs/benchmarks.md
# and the README's summary table (bench/report.py).
bench: deps build driver
	$(PY) -m bench

bench-readme:
	$(PY) -m bench.report sync-readme

clean:
	rm -rf $(DIST) .pyi-work tests/tools/bin $(GENERATED)

-include mk/*.mk
