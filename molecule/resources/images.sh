#!/usr/bin/env bash
# Every image the Molecule scenarios use, built offline on this machine (DESIGN.md §6):
#   homeiot/debian-systemd:{trixie,bookworm}  systemd hosts (server, Pi)
#   homeiot/debian-slim:bookworm              base for service stand-ins (and debian:bookworm-slim)
#   homeiot-standin/mosquitto:2.0.11          eclipse-mosquitto stand-in (Debian's mosquitto)
#   homeiot-standin/influxdb:1.6.7            influxdb:1.x stand-in (Debian's influxdb)
#   homeiot/client:bookworm                   the scenarios' LAN client (not with `images.sh lab`)
#
#   molecule/resources/images.sh [lab]        lab: only what `make lab` runs (no LAN client)
#
# Base images are cached (see build-image.sh); docker build reuses its layer cache. Independent
# builds run side by side (the three debootstraps, then the stand-ins on debian-slim): each waits
# on the network and on dpkg in turn, so two at once overlap. Each build's output is prefixed
# with its tag; the first failure stops the script after the others finished.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
standins=(mosquitto:homeiot-standin/mosquitto:2.0.11 influxdb:homeiot-standin/influxdb:1.6.7)
case ${1:-all} in
    all) standins+=(client:homeiot/client:bookworm) ;;
    lab) ;;
    *) echo "usage: images.sh [lab]" >&2; exit 2 ;;
esac

# Run "TAG command…" jobs side by side; fail when any failed.
parallel() {
    local pids=() tags=() i rc=0
    while [ $# -gt 0 ]; do
        local tag=$1 cmd=$2
        shift 2
        (eval "$cmd" 2>&1 | sed -u "s|^|[$tag] |"; exit "${PIPESTATUS[0]}") &
        pids+=($!) tags+=("$tag")
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || { echo "image ${tags[$i]}: failed" >&2; rc=1; }
    done
    return "$rc"
}

build_standin() {  # DIR TAG; the legacy builder's deprecation notice only with a failure
    local out
    out=$(docker build --quiet --tag "$2" "$here/images/$1" 2>&1 >/dev/null) || { echo "$out"; return 1; }
    echo "image $2: built"
}

parallel \
    homeiot/debian-systemd:trixie "'$here/build-image.sh' trixie homeiot/debian-systemd:trixie" \
    homeiot/debian-systemd:bookworm "'$here/build-image.sh' bookworm homeiot/debian-systemd:bookworm" \
    homeiot/debian-slim:bookworm "'$here/build-image.sh' bookworm homeiot/debian-slim:bookworm ca-certificates"
jobs=()
for spec in "${standins[@]}"; do
    dir=${spec%%:*} tag=${spec#*:}
    jobs+=("$tag" "build_standin $dir $tag")
done
parallel "${jobs[@]}"
