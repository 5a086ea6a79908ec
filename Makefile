# Stoker — `make run` starts a daemon against a local PostgreSQL; `make test` runs everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEV_PG := .stoker/pg
# Django 6 (daemon.contrib.django) needs Python >= 3.12 while the daemon supports 3.11: the
# Django tests run in a virtualenv of their own, made with the first Python 3.12 that runs
# (pyenv's shim for python3.12 is on PATH yet fails unless 3.12 is selected, hence the check).
PYTHON312 ?= $(shell for p in python3.12 /root/.pyenv/versions/3.12*/bin/python; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null \
	&& { command -v "$$p"; break; }; done)
DJANGO_VENV  := .venv-django
DJANGO_STAMP := $(DJANGO_VENV)/.installed-stamp
# Debian's package lists are fetched once per virtualenv, before the first package we install.
APT_UPDATE = { [ -f $(VENV)/.apt-updated ] || { apt-get update -qq && touch $(VENV)/.apt-updated; }; }

.PHONY: install run test test-django test-tools lint format db-start db-stop bench bench-peers bench-profile postgres-binaries clean screenshots

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
			$(APT_UPDATE) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
		else \
			$(BIN)/python -c 'from daemon.dev.pgcluster import INSTALL_HINT; print(INSTALL_HINT)'; exit 1; \
		fi; }

db-start: postgres-binaries
	@$(BIN)/python -m daemon.dev.pgcluster start $(DEV_PG)

db-stop: install
	@$(BIN)/python -m daemon.dev.pgcluster stop $(DEV_PG)

# The production catalogue (deploy/stoker.toml) with the demo layer (deploy/demo.toml) on top,
# against the local development cluster loaded with deploy/demo.sql and its files. With
# DATABASE_URL set, the catalogue alone runs against that database and nothing is loaded.
DEMO_CONFIG := --config deploy/stoker.toml --config deploy/demo.toml

run: install
	@if [ -n "$$DATABASE_URL" ]; then \
		echo "DATABASE_URL is set: running deploy/stoker.toml against it (no demo layer, no demo tables)"; \
		exec $(BIN)/stoker --config deploy/stoker.toml run --log-format text; \
	fi; \
	$(MAKE) --no-print-directory postgres-binaries || exit 1; \
	dsn=$$($(BIN)/python -m daemon.dev.pgcluster start $(DEV_PG)) || exit 1; \
	export DATABASE_URL="$$dsn" DEMO_DIR="$(CURDIR)/.stoker/demo"; \
	$(BIN)/stoker $(DEMO_CONFIG) migrate >/dev/null || exit 1; \
	$(BIN)/python -m daemon.dev.pgcluster load "$$dsn" deploy/demo.sql || exit 1; \
	$(BIN)/python deploy/demo/make_files.py "$$DEMO_DIR" || exit 1; \
	echo "demo tables, files and jobs loaded (deploy/demo.sql, .stoker/demo); emails go to .stoker/outbox/"; \
	echo "the demo_* schedules fire every minute; the catalogue keeps its production cadence"; \
	echo "PostgreSQL (dev cluster in $(DEV_PG)): psql $$dsn"; \
	echo "try: export DATABASE_URL=$$dsn DEMO_DIR=$$DEMO_DIR STOKER_CONFIG=deploy/stoker.toml:deploy/demo.toml"; \
	echo "     .venv/bin/stoker schedules; .venv/bin/stoker jobs list"; \
	echo "stop it later with: make db-stop"; \
	exec $(BIN)/stoker $(DEMO_CONFIG) run --log-format text

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy --strict --ignore-missing-imports deploy/demo
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# systemd-analyze checks deploy/stoker.service in the tests; without it that one test skips.
# pgbouncer (Debian's package, in /usr/sbin) runs in front of the test PostgreSQL in
# tests/test_pgbouncer.py; Debian's package also installs a service, which the tests never use.
# Chromium (Debian's package) runs the dashboard's browser tests, driven by Playwright through
# its executable_path: no browser is ever downloaded.
test-tools:
	@command -v systemd-analyze >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing systemd (for systemd-analyze verify)"; \
			$(APT_UPDATE) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null \
				|| echo "could not install systemd: the unit-file test will be skipped"; \
		fi; }
	@command -v chromium >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing chromium (for the dashboard's browser tests)"; \
			$(APT_UPDATE) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "the dashboard's browser tests need Chromium: install Debian's chromium package"; exit 1; \
		fi; }
	@[ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing pgbouncer (for the tests behind a transaction pooler)"; \
			$(APT_UPDATE) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; \
		else \
			echo "the pgbouncer tests need pgbouncer: install Debian's pgbouncer package"; exit 1; \
		fi; }

test: install postgres-binaries test-tools lint
	$(BIN)/pytest
	@$(MAKE) --no-print-directory test-django

# tests/test_django.py under Python 3.12 (the 3.11 run above skips it). The daemon it starts
# is this virtualenv's too (sys.executable), so it holds Stoker's own dependencies as well.
test-django: postgres-binaries
	@if [ -z "$(PYTHON312)" ]; then \
		echo "SKIPPED tests/test_django.py: no Python 3.12 found (Django 6 needs it); set PYTHON312=/path/to/python3.12"; \
	else \
		$(MAKE) --no-print-directory $(DJANGO_STAMP) && $(DJANGO_VENV)/bin/python -m pytest tests/test_django.py; \
	fi

$(DJANGO_STAMP): pyproject.toml
	$(PYTHON312) -m venv $(DJANGO_VENV)
	$(DJANGO_VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[django]' \
		"psycopg[binary]>=3.1" "pytest>=8.0" "pytest-asyncio>=0.24" "pytest-timeout>=2.3"
	@touch $(DJANGO_STAMP)

# The dashboard's pages at 1280x800 and 390x844, taken by its browser tests (README links them).
screenshots: install postgres-binaries test-tools
	STOKER_SCREENSHOTS=$(CURDIR)/docs/screenshots $(BIN)/pytest -q tests/test_dashboard.py tests/test_dashboard_*.py

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
	rm -rf $(VENV) $(DJANGO_VENV) .stoker .mypy_cache .ruff_cache .pytest_cache
