#!/usr/bin/env bash
# Debian's chromium and chromedriver, for tests/test_view.py's browser test (minigpt view itself needs no browser
# on the machine that serves it). Nothing to do when both are installed; otherwise apt-get, as root or with sudo.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
as_root=""
[ "$(id -u)" = 0 ] || as_root="sudo"
$as_root apt-get update -q
DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -q chromium chromium-driver
