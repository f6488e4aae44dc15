#!/usr/bin/env bash
# Run the whole test suite: installs what it needs (Debian packages and a .venv),
# checks style, then runs unit, integration and browser tests against real
# Dovecot, SMTP sink and PostgreSQL instances on loopback.
source "$(dirname "$0")/_env.sh" --test
ruff check --no-cache .
exec python -m pytest -q "$@"
