#!/usr/bin/env bash
# The Debian packages the whole test suite needs, installed when missing. `make test` and
# `.ci/run` both run this before anything else.
#
#   scripts/system_deps.sh            install what is missing (as root), or stop with the line
#   scripts/system_deps.sh --dry-run  print what it would run, change nothing
#   scripts/system_deps.sh --list     print the missing packages, one a line
#
# Without root and with packages missing it exits 1 and prints the exact `apt-get install`
# line to run. CMAMBA_SYSTEM_DEPS=skip turns the check off (the tests that need a missing
# tool then fail, naming it). SYSTEM_DEPS_ROOT prefixes the fixed paths it checks (tests).
set -euo pipefail

mode=install
case "${1:-}" in
    "") ;;
    --dry-run) mode=dry-run ;;
    --list) mode=list ;;
    *)
        echo "usage: $0 [--dry-run | --list]" >&2
        exit 2
        ;;
esac

if [ "${CMAMBA_SYSTEM_DEPS:-}" = "skip" ]; then
    echo "system_deps: CMAMBA_SYSTEM_DEPS=skip, not checking the Debian packages" >&2
    exit 0
fi

root="${SYSTEM_DEPS_ROOT:-}"
missing=()
# Prometheus and promtool (tests/deploy: rule tests, live monitoring).
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 \
    || missing+=(prometheus)
# Alertmanager and amtool (tests/deploy/test_alerting.py: a dead service pages a webhook).
[ -x "$root/usr/bin/prometheus-alertmanager" ] && [ -x "$root/usr/bin/amtool" ] \
    || missing+=(prometheus-alertmanager)
# Compose v1 (tests/deploy/test_compose.py; v2 comes from the dev extras).
[ -x "$root/usr/bin/docker-compose" ] || missing+=(docker-compose)
# HAProxy 2.6 (Debian 12), the oldest release deploy/ray/haproxy.cfg supports: tests/ray run
# the failover rules on it and on the HAProxy 2.8 binary that ray[serve] installs.
[ -x "$root/usr/sbin/haproxy" ] || missing+=(haproxy)
# Headless Chromium for the web page tests (tests/webui, driven by Playwright).
[ -x "$root/usr/bin/chromium" ] || missing+=(chromium)
# PostgreSQL server binaries, any major version (tests/pg.py: the job store's shared database;
# Debian keeps initdb and pg_ctl off PATH, under /usr/lib/postgresql/<major>/bin).
postgresql_found=no
for pg_ctl in "$root"/usr/lib/postgresql/*/bin/pg_ctl; do
    [ -x "$pg_ctl" ] && [ -x "${pg_ctl%/pg_ctl}/initdb" ] && postgresql_found=yes
done
[ "$postgresql_found" = yes ] || missing+=(postgresql)

if [ "$mode" = list ]; then
    [ "${#missing[@]}" -eq 0 ] || printf '%s\n' "${missing[@]}"
    exit 0
fi
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

install_line="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$mode" = dry-run ]; then
    echo "apt-get update"
    echo "$install_line"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    {
        echo "error: the test suite needs Debian packages that are missing: ${missing[*]}"
        echo "Install them as root, then run make test again:"
        echo
        echo "    $install_line"
        echo
        echo "(CMAMBA_SYSTEM_DEPS=skip make test runs anyway; the tests that need them fail.)"
    } >&2
    exit 1
fi
echo "system_deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
