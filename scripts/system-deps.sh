#!/usr/bin/env bash
# The Debian packages the test suite drives, installed when missing: Chromium, for the dashboard's browser tests
# (tests/ui/test_browser.py), and PostgreSQL, whose server the run store's contract tests start in a throwaway
# cluster of their own (the postgres fixture in tests/conftest.py). Part of the README's test command, so CI's
# clean machine gets them.
# Without apt-get or root it only says what is missing: those tests then skip, except under CI (CI set), where
# they fail.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1; then
  run=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then run=(sudo -n); else run=(); fi
  fi
  if [ "$(id -u)" = 0 ] || [ ${#run[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    "${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    exit 0
  fi
fi
echo "note: ${missing[*]} missing and not installable here; the tests that need it will skip" >&2
