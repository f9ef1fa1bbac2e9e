#!/usr/bin/env bash
# Make the base image of deploy/Dockerfile locally, for Docker hosts that cannot pull from a
# registry (the official python image is the default base everywhere else):
#
#   sudo bash deploy/make-base-image.sh [TAG]        # default TAG: canopy-base:bookworm
#   docker build -f deploy/Dockerfile --target cpu -t canopy:cpu \
#       --build-arg PYTHON_IMAGE=canopy-base:bookworm .
#
# debootstrap of Debian bookworm with python3 and python3-venv (bookworm's Python is 3.11,
# as canopy needs), plus this host's CA certificates, so that apt and pip inside the build
# trust whatever this host trusts (a TLS-inspecting proxy, say); then `docker import`. The
# tag is a local name, never an official image's. Needs root, debootstrap and a reachable
# Debian mirror (MIRROR, SECURITY_MIRROR: deb.debian.org). Does nothing when TAG already exists,
# unless FORCE=1.
set -euo pipefail

TAG=${1:-canopy-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
DOCKER=${DOCKER:-docker}

die() { printf 'make-base-image: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found (apt-get install debootstrap)"
if [[ ${FORCE:-0} != 1 ]] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    exit 0
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/canopy-base.XXXXXX")
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$MIRROR" >&2
# The host's trust store replaces the image's; update-ca-certificates in a later apt run
# rebuilds the bundle from /usr/share/ca-certificates and /usr/local/share/ca-certificates,
# so the host's extra authorities go there too.
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
install -d "$root/usr/local/share/ca-certificates/host"
if [[ -d /usr/local/share/ca-certificates ]]; then
    find /usr/local/share/ca-certificates -name '*.crt' -exec cp -L {} "$root/usr/local/share/ca-certificates/host/" \;
fi
# debootstrap lists the release alone; security fixes come with the other two suites.
cat > "$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
SOURCES
# The apt lists debootstrap fetched only grow the image; image-setup.sh runs apt-get update.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb

tar -C "$root" --numeric-owner -c . \
    | "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$TAG" >/dev/null
printf 'make-base-image: %s\n' "$TAG" >&2
