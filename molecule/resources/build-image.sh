#!/usr/bin/env bash
# Build a Debian base image with systemd for Molecule platforms — offline, no image registry:
# debootstrap from Debian's mirror over http, then `docker import` (DESIGN.md §6).
#
#   molecule/resources/build-image.sh SUITE TAG [PACKAGES]
#       e.g.  trixie homeiot/debian-systemd:trixie
#             bookworm homeiot/debian-slim:bookworm ca-certificates   (a base for service stand-ins)
#
# Cached twice: an image already tagged TAG is kept as it is, and the root filesystem tarball in
# ${IMAGE_CACHE:-.cache/images}/<tag>.tar is reused, so a second run costs seconds, not minutes.
set -euo pipefail

suite=${1:?usage: build-image.sh SUITE TAG}
tag=${2:?usage: build-image.sh SUITE TAG}
packages=${3:-systemd,systemd-sysv,python3,sudo,procps,iproute2,ca-certificates}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache_dir=${IMAGE_CACHE:-.cache/images}

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "image $tag: present"
    exit 0
fi

tarball=$cache_dir/${tag//[:\/]/_}.tar
if [ ! -s "$tarball" ]; then
    mkdir -p "$cache_dir"
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    echo "image $tag: debootstrap $suite from $mirror (a few minutes)"
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log"; exit 1; }
    rm -f "$rootfs.log"
    # A container boots systemd without consoles, udev or a fixed machine id (harmless without systemd).
    : >"$rootfs/etc/machine-id"
    rm -f "$rootfs"/etc/systemd/system/getty.target.wants/* \
          "$rootfs"/lib/systemd/system/multi-user.target.wants/getty.target
    printf 'deb %s %s main\n' "$mirror" "$suite" >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # mktemp made the root 0700; as the image's "/" that locks every non-root user out of
    # everything (Docker's vfs driver keeps it; overlay2 happens to hide it).
    chmod 0755 "$rootfs"
    tar -C "$rootfs" -c . >"$tarball.tmp"
    mv "$tarball.tmp" "$tarball"
fi

case ",$packages," in
    *,systemd,*) cmd='["/lib/systemd/systemd"]' ;;
    *) cmd='["/bin/bash"]' ;;
esac
docker import --change 'ENV container=docker' --change "CMD $cmd" "$tarball" "$tag" >/dev/null
echo "image $tag: imported from $tarball"
