#!/bin/bash
# First start: create the admin, the database and its user the way upstream's init-influxdb.sh
# does (a temporary influxd on 127.0.0.1 with auth off), then run the real command.
set -euo pipefail

if [ "${1:-}" = influxd ] && [ ! -e /var/lib/influxdb/meta/meta.db ] && [ -n "${INFLUXDB_DB:-}${INFLUXDB_ADMIN_USER:-}" ]; then
    INFLUXDB_HTTP_BIND_ADDRESS=127.0.0.1:8086 INFLUXDB_HTTP_AUTH_ENABLED=false influxd >/tmp/init.log 2>&1 &
    pid=$!
    for _ in $(seq 1 60); do curl -fs http://127.0.0.1:8086/ping >/dev/null && break; sleep 0.5; done
    q() { curl -fsS -XPOST http://127.0.0.1:8086/query --data-urlencode "q=$1" >/dev/null; }
    if [ -n "${INFLUXDB_ADMIN_USER:-}" ]; then
        q "CREATE USER \"$INFLUXDB_ADMIN_USER\" WITH PASSWORD '${INFLUXDB_ADMIN_PASSWORD:?}' WITH ALL PRIVILEGES"
    fi
    if [ -n "${INFLUXDB_DB:-}" ]; then
        q "CREATE DATABASE \"$INFLUXDB_DB\""
        if [ -n "${INFLUXDB_USER:-}" ]; then
            q "CREATE USER \"$INFLUXDB_USER\" WITH PASSWORD '${INFLUXDB_USER_PASSWORD:?}'"
            q "GRANT ALL ON \"$INFLUXDB_DB\" TO \"$INFLUXDB_USER\""
        fi
    fi
    kill "$pid"
    wait "$pid" || true
    echo "influxdb init: database ${INFLUXDB_DB:-none}, users created"
fi

exec "$@"
