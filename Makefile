# Two commands on a fresh machine: `make run` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The demo PBX's secret of the sample config (its [[sip.pbx]] "demo-0001"): random,
# owner-only, made once; `softrelay simulate` in another terminal reads it too.
DEMO_SECRET := var/demo-pbx.secret

$(DEMO_SECRET):
	mkdir -p -m 700 var
	umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))' > $@.tmp
	mv $@.tmp $@

# The sample config's other demo keys, made the same way (hex: a crash DSN key is
# letters and digits): the usage tenant "demo" and crash project 1 that `softrelay
# simulate` pings and reports to, and the operator console's admin token.
DEMO_KEYS := var/demo-usage.key var/demo-crash.key var/console.token

$(DEMO_KEYS):
	mkdir -p -m 700 var
	umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_hex(24))' > $@.tmp
	mv $@.tmp $@

run: $(STAMP) $(DEMO_SECRET) $(DEMO_KEYS)
	$(BIN)/softrelay serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint $(DEMO_SECRET) $(DEMO_KEYS)
	$(BIN)/pytest

bench: $(STAMP) $(DEMO_SECRET) $(DEMO_KEYS)
	$(BIN)/python bench/store.py
	$(BIN)/python bench/wake.py --quick
	$(BIN)/python bench/sipis.py --quick
	$(BIN)/python bench/contacts.py --quick
	$(BIN)/python bench/phones.py --quick
	$(BIN)/python bench/relay_idle.py --quick
	$(BIN)/python bench/usage.py --quick

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache
