#!/usr/bin/env bash
# Install minigpt with its test tools (into .venv unless a virtual environment is active) and run the tests.
# Extra arguments go to pytest, e.g. scripts/test.sh -k resume
set -euo pipefail
cd "$(dirname "$0")/.."
MINIGPT_EXTRAS=test . scripts/_venv.sh
# Tiny Shakespeare for anything that wants the default corpus: use a local copy if there is one.
if [ -z "${MINIGPT_DATA_DIR:-}" ] && [ -f ../shared/data/tinyshakespeare.txt ]; then
  export MINIGPT_DATA_DIR="$PWD/../shared/data"
fi
python -m pytest -q "$@"
