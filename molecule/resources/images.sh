#!/usr/bin/env bash
# Every image the Molecule scenarios use, built offline on this machine (DESIGN.md §6):
#   homeiot/debian-systemd:{trixie,bookworm}  systemd hosts (server, Pi)
#   homeiot/debian-slim:bookworm              base for service stand-ins (and debian:bookworm-slim)
#   homeiot-standin/mosquitto:2.0.11          eclipse-mosquitto stand-in (Debian's mosquitto)
#   homeiot-standin/influxdb:1.6.7            influxdb:1.x stand-in (Debian's influxdb)
#   homeiot/client:bookworm                   the scenarios' LAN client
# Base images are cached (see build-image.sh); docker build reuses its layer cache.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/build-image.sh" trixie homeiot/debian-systemd:trixie
"$here/build-image.sh" bookworm homeiot/debian-systemd:bookworm
"$here/build-image.sh" bookworm homeiot/debian-slim:bookworm ca-certificates
for spec in mosquitto:homeiot-standin/mosquitto:2.0.11 influxdb:homeiot-standin/influxdb:1.6.7 \
            client:homeiot/client:bookworm; do
    dir=${spec%%:*} tag=${spec#*:}
    docker build --quiet --tag "$tag" "$here/images/$dir" >/dev/null
    echo "image $tag: built"
done
