#!/usr/bin/env bash
# Make the base images locally from Debian packages, for machines that cannot pull from a registry
# (air-gapped, or only a Debian mirror and PyPI reachable). Two images, both Debian bookworm minbase:
#
#   avsearch-base/python:3.11-bookworm   python3 + venv: stands in for python:3.11-slim (BASE_IMAGE)
#   avsearch-base/debian:bookworm        no Python: stands in for a base without one (the CUDA
#                                        runtime image), so the Dockerfile's install-Python path is tested
#
# Usage: docker/make-base-images.sh            (skips the images that exist; FORCE=1 remakes them)
# Needs root, a running Docker engine and debootstrap (installed with apt-get when missing).
# Settings: MIRROR (default: the first Debian mirror apt uses here), SUITE (bookworm),
# CA_BUNDLE (default: the host's; PyPI may be reached through a proxy only the host's CAs trust).
set -euo pipefail

SUITE=${SUITE:-bookworm}
PYTHON_IMAGE=${PYTHON_IMAGE:-avsearch-base/python:3.11-bookworm}
PLAIN_IMAGE=${PLAIN_IMAGE:-avsearch-base/debian:bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
FORCE=${FORCE:-0}

die() { echo "make-base-images: error: $*" >&2; exit 1; }

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if [[ $FORCE != 1 ]] && have_image "$PYTHON_IMAGE" && have_image "$PLAIN_IMAGE"; then
    echo "make-base-images: $PYTHON_IMAGE and $PLAIN_IMAGE exist (FORCE=1 remakes them)"
    exit 0
fi

[[ $(id -u) == 0 ]] || die "debootstrap needs root"
if ! command -v debootstrap >/dev/null; then
    echo "make-base-images: installing debootstrap (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; } \
        || die "debootstrap is missing and apt-get could not install it"
fi
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd first)"
[[ -r $CA_BUNDLE ]] || die "CA bundle $CA_BUNDLE is not readable (set CA_BUNDLE)"

# The mirror apt already uses: deb822 sources first (URIs: ...), then one-line sources.list.
if [[ -z ${MIRROR:-} ]]; then
    MIRROR=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
    [[ -n $MIRROR ]] || MIRROR=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
    [[ -n $MIRROR ]] || die "found no Debian mirror in /etc/apt/sources.list*; set MIRROR=http://deb.debian.org/debian"
fi

work=$(mktemp -d /var/tmp/avsearch-base.XXXXXX)
cleanup() { rm -rf --one-file-system "$work"; }
trap cleanup EXIT

rootfs=$work/rootfs
echo "make-base-images: debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

# Later apt-get runs in the images use the same mirror; no recommends, like the slim images.
echo "deb $MIRROR $SUITE main" >"$rootfs/etc/apt/sources.list"
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$rootfs/etc/apt/apt.conf.d/90-avsearch-slim"

shrink() {  # what python:*-slim leaves out too: package lists and caches, docs, man pages, locales
    rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb \
        "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/info/* "$1"/var/log/*.log
    find "$1/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
}

import() {  # docker import of a root filesystem, with the image config a base image carries
    # The host's CA bundle, last (a ca-certificates trigger would regenerate it): pip in the builds
    # verifies PyPI against it, and PyPI may be reached through a proxy only the host's CAs trust.
    cp "$CA_BUNDLE" "$1/etc/ssl/certs/ca-certificates.crt"
    tar -C "$1" --numeric-owner -c . | docker import \
        --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase from $MIRROR, made by docker/make-base-images.sh\"" \
        - "$2" >/dev/null
    echo "make-base-images: $2 ($(docker image inspect -f '{{.Size}}' "$2" | awk '{printf "%.0f MB", $1/1e6}'))"
}

# pip (in the builds' venvs) verifies TLS against the system bundle, the host's CAs, instead of its
# own certifi copy, which knows no proxy CA.
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
shrink "$rootfs"
import "$rootfs" "$PLAIN_IMAGE"

# python3 + venv (ensurepip's pip wheel) from Debian's packages, as the builds use them.
mount_chroot() { mount -t proc proc "$rootfs/proc"; }
umount_chroot() { umount "$rootfs/proc" 2>/dev/null || true; }
trap 'umount_chroot; cleanup' EXIT
mount_chroot
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
chroot "$rootfs" apt-get update -qq >"$work/apt.log" 2>&1 \
    && chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >>"$work/apt.log" 2>&1 \
    || { tail -n 30 "$work/apt.log" >&2; die "apt-get install python3 python3-venv failed in the new root (log above)"; }
umount_chroot
: >"$rootfs/etc/resolv.conf"  # Docker writes its own at run time
shrink "$rootfs"
import "$rootfs" "$PYTHON_IMAGE"
