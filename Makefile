# token-broker: `make run` serves on the embedded SQLite default, `make test` runs every check.
# Both install what they need into .venv first; nothing else is required on the machine
# but Python 3.11+.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard protos/tokenbroker/v1/*.proto)
GEN_DIR := clients

.PHONY: install postgres-server browser node-deps run test wheels lint typecheck buflint breaking contract-baseline protos check-protos limits-doc pytest bench demo clean

install: $(STAMP)

# Two distributions from one checkout, both editable: the client library (clients/, with
# its tracing extra) and the server, which depends on it.
$(STAMP): pyproject.toml clients/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e './clients[tracing]' -e '.[dev]'
	@touch $@

run: install
	$(BIN)/token-broker serve $(ARGS)

test: install postgres-server browser node-deps check-protos lint typecheck buflint breaking wheels pytest

# The PostgreSQL tests start a throw-away server of their own (tests/pgcluster.py); they need
# the server binaries. On a machine without them, as root, this installs Debian's package.
postgres-server:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then \
	  echo "PostgreSQL server binaries present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's postgresql package for the PostgreSQL tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; }; \
	else \
	  echo "PostgreSQL server binaries missing: install the postgresql package (the tests need initdb)"; exit 1; \
	fi

# The audit console's test renders its page in headless Chromium (Debian's package); on a
# machine without it, as root, this installs it, as postgres-server does PostgreSQL.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  echo "Chromium present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium package for the audit console test"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; }; \
	else \
	  echo "Chromium missing: install the chromium package (the audit console test needs it)"; exit 1; \
	fi

# The Node.js delegate (clients/node) and its test need its packages, exactly as locked; on a
# machine without node the test says it is skipped. (--ignore-scripts: no package needs its
# install script; protobufjs's only checks versions.)
NODE_MODULES := clients/node/node_modules/.installed

node-deps:
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory $(NODE_MODULES); \
	else \
	  echo "node not found: the Node.js delegate test (tests/test_node_delegate.py) will be skipped"; \
	fi

$(NODE_MODULES): clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	@touch $@

# The whole story in one command: a throw-away broker, a test IdP, the sample executor and API.
# With OTEL_EXPORTER_OTLP_ENDPOINT (etc.) set it exports the story as one trace and prints its id.
demo: install
	$(BIN)/token-broker demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

buflint: install
	$(BIN)/buf lint

# The contract never breaks by accident: `buf breaking` (offline) compares protos/ with the
# image of the last release in $(BASELINE). When you cut a release, run `make contract-baseline`
# and commit the new image with the release.
BASELINE := protos/baseline.binpb

breaking: install
	$(BIN)/buf breaking --against $(BASELINE)

contract-baseline: install
	$(BIN)/buf build --exclude-source-info -o $(BASELINE)

# Both distributions build as wheels (into build/wheels, not committed); the tests install
# the client's into an empty virtualenv (tests/test_client_wheel.py).
WHEELS := build/wheels

wheels: install
	@rm -rf $(WHEELS)
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w $(WHEELS) ./clients .
	@ls $(WHEELS)

# On every core; PYTEST_ARGS="-n0" runs in one process (e.g. to debug with -x or pdb).
pytest: install
	$(BIN)/pytest -n auto $(PYTEST_ARGS)

# Stubs are committed so that an editable install needs no code generation; `make protos`
# regenerates them and `check-protos` (part of `make test`) proves they match the .proto files.
protos: install
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) \
	  --mypy_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) $(PROTO_FILES)

check-protos: install
	@tmp=$$(mktemp -d) && \
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp \
	  $(PROTO_FILES) && \
	for f in $$(cd $$tmp && find . -type f); do \
	  cmp -s $$tmp/$$f $(GEN_DIR)/$$f || { echo "stale generated stub: $(GEN_DIR)/$$f (run 'make protos')"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "generated stubs are current"

# The request limits beside the .proto files, from the one table in broker/limits.py
# (tests/test_limits_table.py fails when this file is stale).
limits-doc: install
	$(PY) -c "import sys, broker.limits as l; sys.stdout.write(l.markdown())" > protos/tokenbroker/v1/LIMITS.md

# A benchmark, not a test: `make bench QUICK=1` takes under a minute (see docs/performance.md).
bench: install
	$(BIN)/token-broker bench $(if $(QUICK),--quick) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
