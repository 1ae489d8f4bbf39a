# modulus.kmods: developer entry points. `make demo` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
COLLROOT := $(CURDIR)/build/collections
COLL := $(COLLROOT)/ansible_collections/modulus/kmods
SANITY_ROOT ?= $(CURDIR)/build/sanity
SANITY := $(SANITY_ROOT)/ansible_collections/modulus/kmods
SANITY_ARGS ?=
PYTEST_ARGS ?=

export PATH := $(BIN):$(PATH)
export PYTHONPATH := $(COLLROOT):$(CURDIR)/tests
export ANSIBLE_COLLECTIONS_PATH := $(COLLROOT)
export ANSIBLE_COLLECTIONS_SCAN_SYS_PATH := false

.PHONY: deps system-deps collection need-root sim sanity units integration lint test demo clean bench

deps: system-deps $(VENV)/.installed collection

system-deps:
	@if [ "$$(id -u)" -eq 0 ]; then bash scripts/install-system-deps.sh; else sudo bash scripts/install-system-deps.sh; fi

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

collection:
	@mkdir -p $(COLLROOT)/ansible_collections/modulus
	@ln -sfn $(CURDIR) $(COLL)

# ansible-test bootstraps pip in its venvs with a script from a host these machines cannot reach:
# put our offline equivalent (ensurepip + the system CA bundle) where it looks first.
ANSIBLE_TEST_GET_PIP := $(HOME)/.ansible/test/cache/get_pip_24_2.py

sanity: $(VENV)/.installed
	@mkdir -p $(dir $(ANSIBLE_TEST_GET_PIP)) && cp scripts/ansible-test-get-pip.py $(ANSIBLE_TEST_GET_PIP)
	rm -rf $(SANITY_ROOT) && mkdir -p $(SANITY)
	git ls-files -z --cached --others --exclude-standard | \
	  grep -zv -E '^(tests/sim|tests/integration|benchmarks|scripts|\.ci)/' | \
	  xargs -0 -I{} cp --parents -P {} $(SANITY)/ 2>/dev/null || true
	# ansible-test lists files through git; the copy lives in an ignored folder, so give it its own repository.
	cd $(SANITY) && git init -q && git add -A && $(BIN)/ansible-test sanity --venv --python 3.11 --requirements --color no $(SANITY_ARGS)

units: $(VENV)/.installed collection
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

# The integration tests and the kit need root (loop devices, mounts, systemd-nspawn): refuse loudly
# rather than report green with every integration test skipped.
need-root:
	@if [ "$$(id -u)" -ne 0 ]; then \
	  echo "make: the integration tests need root (loop devices, mounts, systemd-nspawn) and did NOT run; run as root" >&2; \
	  exit 1; fi

# Build (or load from its cache) the Flatcar simulation kit, with progress lines.
sim: need-root $(VENV)/.installed collection
	$(BIN)/python -m sim build >/dev/null

integration: need-root sim
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

lint: $(VENV)/.installed collection
	$(BIN)/ruff check plugins tests benchmarks
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint --profile production

# Each part in turn, with its wall time (stops at the first that fails).
TEST_PARTS := lint sanity units integration molecule
test:
	@for part in $(TEST_PARTS); do \
	  start=$$(date +%s); $(MAKE) --no-print-directory $$part || { echo "make test: $$part failed after $$(( $$(date +%s) - start )) s" >&2; exit 1; }; \
	  echo "make test: $$part passed in $$(( $$(date +%s) - start )) s"; \
	done

# The role end to end under Molecule (extensions/molecule), against the simulated fleet (tests/sim/stack.py):
# "default" (one host: converge, idempotence, verify) and "fleet" (four hosts, one store, one compile).
.PHONY: molecule
molecule: need-root sim
	$(BIN)/molecule test --all

demo: deps sim
	$(BIN)/python -m sim.demo

bench: deps
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf build tests/output .pytest_cache
