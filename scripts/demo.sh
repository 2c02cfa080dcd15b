#!/usr/bin/env bash
# Install minigpt with its `plot` extra (into .venv unless a virtual environment is active), train the
# default CPU config on Tiny Shakespeare (fetched into data/ the first time, or taken from $MINIGPT_DATA_DIR),
# then sample from it. The extra is matplotlib, which draws the attention/probe images TensorBoard shows.
# Running it again continues the same run (a finished run just samples).
set -euo pipefail
cd "$(dirname "$0")/.."
MINIGPT_EXTRAS=plot . scripts/_venv.sh
config="${1:-configs/shakespeare_char_cpu.yaml}"
run="runs/$(basename "$config" .yaml)"
if [ -f "$run/last.pt" ]; then
  minigpt train --config "$config" --resume
else
  minigpt train --config "$config"
fi
minigpt sample --checkpoint "$run" --prompt "ROMEO:" --max-new-tokens 500
