#!/bin/sh
# Builds a Python 3.11 base image from Debian's packages, for sites whose Docker engine reaches no image registry
# (python:3.11-slim cannot be pulled there). The images take it through their PYTHON_IMAGE build argument:
#   deploy/base-image.sh crest-python:3.11-bookworm
#   PYTHON_IMAGE=crest-python:3.11-bookworm docker compose -f docker-compose.yml -f deploy/compose.cpu.yml build
# Needs root, debootstrap and a running engine. The Debian mirror is the first one of this machine's apt sources
# that serves bookworm (DEBIAN_MIRROR overrides it). The machine's CA bundle goes into the image, so that pip
# inside a build trusts what the machine trusts. Does nothing when the image exists (FORCE=1 rebuilds it).
set -eu

name=${1:?usage: deploy/base-image.sh IMAGE_NAME}
if [ "${FORCE:-0}" != 1 ] && docker image inspect "$name" >/dev/null 2>&1; then
    echo "base image $name exists"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    # deb822 sources (URIs: ... / Suites: ...) first, then one-line sources (deb URI SUITE ...).
    mirror=$(awk '/^URIs:/ { uri = $2 } /^Suites:/ && / bookworm( |$)/ && uri { print uri; exit }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
fi
if [ -z "$mirror" ]; then
    mirror=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
fi
[ -n "$mirror" ] || { echo "no bookworm mirror in /etc/apt/sources*: set DEBIAN_MIRROR" >&2; exit 1; }

root=$(mktemp -d /tmp/crest-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "bootstrapping $name from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# Debian names the interpreter python3; the images and their health probes call `python`.
ln -sf python3 "$root/usr/bin/python"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
tar -C "$root" -c . | docker import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python"]' \
    - "$name"
echo "base image $name: $(docker image inspect --format '{{.Size}}' "$name") bytes"
