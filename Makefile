# Two commands matter: `make node` and `make test`. Each sets up what it
# needs first (scripts/setup.sh), so both work on a fresh machine.
PY := .venv/bin/python

.PHONY: node test setup setup-test bench-setup doctor lint typecheck pytest clean

node: setup
	$(PY) -m polykey node $(ARGS)

test: setup-test lint typecheck pytest

setup:
	@bash scripts/setup.sh node

setup-test:
	@bash scripts/setup.sh test

# Everything bench/README.md's commands need (grpcio, bench/js's npm peers).
bench-setup:
	@bash scripts/setup.sh bench

# What is present and what is missing, each with the version found.
doctor:
	@bash scripts/setup.sh --check

lint:
	$(PY) -m ruff check polykey tests bench examples setup_quiche.py

typecheck:
	$(PY) -m mypy

pytest:
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info polykey/quic/_quiche.* .venv
