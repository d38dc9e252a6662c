#!/usr/bin/env bash
# System packages that team mode and its tests use, from Debian's archive, installed only when missing:
#   postgresql  - the database behind the Prefect and MLflow servers (`alignflow server up`)
#   chromium    - the headless browser of the Prefect UI screenshot test
# Needs root (or sudo) and apt; on other systems install the same two packages your own way.
set -euo pipefail
missing=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if ! command -v apt-get >/dev/null; then
  echo "team mode needs: ${missing[*]} (no apt-get here: install them yourself)" >&2
  exit 0   # the team tests then fail with that message under CI, and are skipped elsewhere
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing ${missing[*]} from Debian's packages (team mode)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
