#!/bin/sh
# The first step of both images, on any base: Python 3.11 as `python` and the user the images run as (10001).
# NVIDIA's CUDA runtime images carry no Python: it comes from their distribution. Debian names it python3.
set -eu
if ! command -v python3.11 >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3.11-venv
    rm -rf /var/lib/apt/lists/*
fi
command -v python >/dev/null || ln -s "$(command -v python3.11)" /usr/local/bin/python
groupadd --system --gid 10001 crest
useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/crest crest
