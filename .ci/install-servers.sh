#!/bin/sh
# Install the PostgreSQL and MariaDB server binaries the real-server tests start themselves
# (tests/harness/servers.py), but only those that are missing.  Debian/Ubuntu, non-interactive.
# Needs root (or sudo).  Does not start or enable any system service we rely on.
set -eu

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

have_postgres() {
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ] && [ -x "$d/postgres" ]; then
            return 0
        fi
    done
    command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1
}

have_mariadb() {
    { [ -x /usr/sbin/mariadbd ] || command -v mariadbd >/dev/null 2>&1; } &&
        { [ -x /usr/bin/mariadb-install-db ] || command -v mariadb-install-db >/dev/null 2>&1; }
}

packages=""
if have_postgres; then
    echo "install-servers: PostgreSQL binaries present"
else
    packages="$packages postgresql"
fi
if have_mariadb; then
    echo "install-servers: MariaDB binaries present"
else
    packages="$packages mariadb-server"
fi

if [ -z "$packages" ]; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Package lists are fetched only when we actually have something to install.
$SUDO apt-get update -q
# shellcheck disable=SC2086  # word splitting of $packages is intended
$SUDO apt-get install -y -q --no-install-recommends $packages
echo "install-servers: installed$packages"

# The packages start system services on the default ports; the tests never use them.
have_postgres || { echo "install-servers: PostgreSQL still missing" >&2; exit 1; }
have_mariadb || { echo "install-servers: MariaDB still missing" >&2; exit 1; }
