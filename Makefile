# hl-monitor. `make help` lists the targets. Everything installs itself with uv into .venv
# (uv itself goes into .tools/); the system Python 3.11 is used, never a downloaded one.
PY ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
# The real interpreter path (not a pyenv shim), so uv never sees a different Python and rebuilds .venv.
export UV_PYTHON := $(shell $(PY) -c 'import sys; print(sys.executable)')
export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy
# Trust the platform's CA store (as pip and curl do): the registry may sit behind a TLS-inspecting proxy.
export UV_SYSTEM_CERTS := 1
CONFIG ?= cfg.toml

.DEFAULT_GOAL := help
.PHONY: help install tools run test lint fmt sim db-upgrade chaos soak bench clean

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(UV):
	$(PY) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.venv/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --locked --quiet
	@touch $@

install: .venv/.synced ## install the service and dev tools into .venv

run: install ## migrate the database, then run the service on embedded defaults (SQLite + embedded NATS)
	$(UV) run --locked hl-monitor db upgrade --config $(CONFIG)
	HL_MONITOR__LOG__FORMAT=$${HL_MONITOR__LOG__FORMAT:-console} $(UV) run --locked hl-monitor run --config $(CONFIG)

lint: install ## ruff + mypy --strict + the layering contracts (import-linter, pyproject.toml)
	$(UV) run --locked ruff check .
	$(UV) run --locked ruff format --check .
	$(UV) run --locked mypy
	$(UV) run --locked lint-imports

fmt: install ## format the code
	$(UV) run --locked ruff format .
	$(UV) run --locked ruff check --fix .

# promtool (alert-rule unit tests), docker-compose (compose validation) and chromium (the console's browser
# tests, driven by Playwright; never `playwright install`: no browser is downloaded) come from Debian's packages.
tools: ## install promtool, docker-compose and chromium from Debian's packages when missing (needs root)
	@if ! command -v promtool >/dev/null || ! command -v docker-compose >/dev/null || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus docker-compose chromium >/dev/null; \
	  else echo "make tools: run as root or install Debian packages prometheus, docker-compose and chromium"; fi; \
	fi

test: lint tools ## lint, then the whole test suite (CI runs exactly this)
	$(UV) run --locked pytest

sim: install ## run the fake Hyperliquid on 127.0.0.1:8765
	$(UV) run --locked hl-monitor sim --host 127.0.0.1 --port 8765

db-upgrade: install ## apply database migrations
	$(UV) run --locked hl-monitor db upgrade --config $(CONFIG)

chaos: install ## fault scenarios end to end, full length, with a 3-minute soak (~18 min; MariaDB at HL_TEST_MYSQL_URL); table → chaos-results.md
	$(UV) run --locked hl-monitor chaos --out chaos-results.md

soak: install ## one hour of a busy day at 20x: memory flat, no growing queue, exactly once (MariaDB, else SQLite); table → soak-results.md
	$(UV) run --locked hl-monitor chaos -s soak --soak-duration 3600 --out soak-results.md

bench: install ## run the benchmarks (about 25 min on 2 busy cores; `--only` picks cases); writes bench-results/results.json and results.md
	$(UV) run --locked hl-monitor bench --out bench-results

clean: ## remove the virtualenvs and caches (keeps ./data)
	rm -rf .venv .tools .pytest_cache .mypy_cache .ruff_cache
