# Stoker — `make run` starts a daemon against a local PostgreSQL; `make test` runs everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEV_PG := .stoker/pg

.PHONY: install run test test-tools lint format db-start db-stop bench bench-peers bench-profile postgres-binaries clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Stoker needs Python >= 3.11 (found: $$($(PYTHON) --version 2>&1)); set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# PostgreSQL server binaries: found via pg_config or /usr/lib/postgresql/*/bin; installed from
# Debian's packages when we are root with apt-get, otherwise we say what to install.
postgres-binaries: install
	@$(BIN)/python -c 'from daemon.dev.pgcluster import find_bindir; find_bindir()' 2>/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing PostgreSQL (apt-get install postgresql)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
		else \
			$(BIN)/python -c 'from daemon.dev.pgcluster import INSTALL_HINT; print(INSTALL_HINT)'; exit 1; \
		fi; }

db-start: postgres-binaries
	@$(BIN)/python -m daemon.dev.pgcluster start $(DEV_PG)

db-stop: install
	@$(BIN)/python -m daemon.dev.pgcluster stop $(DEV_PG)

run: install
	@if [ -n "$$DATABASE_URL" ]; then dsn="$$DATABASE_URL"; \
	else $(MAKE) --no-print-directory postgres-binaries || exit 1; \
		dsn=$$($(BIN)/python -m daemon.dev.pgcluster start $(DEV_PG)) || exit 1; \
		DATABASE_URL="$$dsn" $(BIN)/stoker --config deploy/stoker.toml migrate >/dev/null || exit 1; \
		$(BIN)/python -m daemon.dev.pgcluster load "$$dsn" deploy/demo.sql || exit 1; \
		echo "demo tables and jobs loaded (deploy/demo.sql); emails go to .stoker/outbox/"; \
		echo "PostgreSQL (dev cluster in $(DEV_PG)): psql $$dsn"; \
		echo "try: psql $$dsn -c \"SELECT stoker.enqueue('default', 'log', '{\\\"message\\\": \\\"hello\\\"}')\""; \
		echo "     export DATABASE_URL=$$dsn; .venv/bin/stoker status"; \
		echo "stop it later with: make db-stop"; \
	fi; \
	DATABASE_URL="$$dsn" exec $(BIN)/stoker --config deploy/stoker.toml run --log-format text

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# systemd-analyze checks deploy/stoker.service in the tests; without it that one test skips.
test-tools:
	@command -v systemd-analyze >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing systemd (for systemd-analyze verify)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null \
				|| echo "could not install systemd: the unit-file test will be skipped"; \
		fi; }

test: install postgres-binaries test-tools lint
	$(BIN)/pytest

bench: install postgres-binaries
	$(BIN)/python -m bench

# The peers and py-spy go into the bench environment only: never dependencies in pyproject.toml.
bench-peers: install postgres-binaries
	$(BIN)/pip install --quiet --disable-pip-version-check "pgqueuer==1.6.*" "procrastinate==3.10.*"
	$(BIN)/python -m bench --peers drain latency

bench-profile: install postgres-binaries
	$(BIN)/pip install --quiet --disable-pip-version-check "py-spy>=0.3"
	$(BIN)/python -m bench.profile

clean:
	-$(BIN)/python -m daemon.dev.pgcluster stop $(DEV_PG)
	rm -rf $(VENV) .stoker .mypy_cache .ruff_cache .pytest_cache
