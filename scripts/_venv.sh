# Sourced by the other scripts: use the active virtual environment, or create .venv and install
# minigpt into it (editable) with the extras named in $MINIGPT_EXTRAS.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "creating virtual environment .venv" >&2
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
extras="${MINIGPT_EXTRAS:-}"
echo "installing minigpt${extras:+[$extras]} and its dependencies (torch is large the first time)" >&2
python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}" >&2
