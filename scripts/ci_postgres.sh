#!/usr/bin/env bash
# Makes PostgreSQL's server binaries (initdb, pg_ctl) available for the tests.
#
# The tests start their own throwaway server (tests/pg_server.py), so this script only
# installs the Debian package 'postgresql' when no initdb is found, and keeps the
# package from starting the system service. Safe to run again.
#
#   bash scripts/ci_postgres.sh
#   SOUP_REQUIRE_POSTGRES=1 bash scripts/test.sh tests/search
set -euo pipefail

find_initdb() {
    local found dir
    if found="$(command -v initdb 2>/dev/null)" && [ -x "$found" ]; then
        echo "$found"
        return 0
    fi
    # /usr/lib/postgresql/<version>/bin, newest version first.
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            echo "$dir/initdb"
            return 0
        fi
    done
    return 1
}

if ! initdb_path="$(find_initdb)"; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ci_postgres: initdb not found and not root; run as root or: sudo apt-get install -y postgresql" >&2
        exit 1
    fi
    # Keep invoke-rc.d / deb-systemd-invoke from starting the system service during the
    # install (exit status 101 = action forbidden); an existing policy is left alone.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
    if ! initdb_path="$(find_initdb)"; then
        echo "ci_postgres: installed 'postgresql' but still no initdb found" >&2
        exit 1
    fi
fi

echo "ci_postgres: using initdb $initdb_path ($("$initdb_path" --version))"
