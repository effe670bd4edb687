#!/usr/bin/env bash
# Install the headless browser of the browser tests (tests/test_report.py): Debian's Chromium and ChromeDriver.
#
#   chromium         -> /usr/bin/chromium
#   chromium-driver  -> /usr/bin/chromedriver   (selenium drives Chromium through it)
#
# Idempotent: nothing is done when both are already there. Needs apt-get; uses sudo only when not root.
# Nothing is downloaded at test time: the tests use exactly these two files.
set -euo pipefail

say() { echo "[install_browser] $*"; }

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    say "chromium and chromedriver already installed: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
    exit 0
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "[install_browser] not root and no sudo: install the Debian packages chromium and chromium-driver" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
t0=$SECONDS
# apt's package lists may be missing on a fresh machine: fetch them once, then retry.
if ! $SUDO apt-get install -y --no-install-recommends chromium chromium-driver; then
    say "apt-get install failed; updating the package lists and retrying"
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends chromium chromium-driver
fi
say "installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium) and chromedriver in $((SECONDS - t0)) s"
