#!/bin/sh
# The upstream eclipse-mosquitto entrypoint, verbatim in behaviour.
set -e

# Set permissions
user="$(id -u)"
if [ "$user" = '0' ]; then
	[ -d "/mosquitto" ] && chown -R mosquitto:mosquitto /mosquitto || true
fi

exec "$@"
