#!/bin/sh
# Install the Debian packages listed in $1 (one a line, # comments), without recommends, and drop apt's lists.
set -eu
apt-get update
# shellcheck disable=SC2046  # one package name a word
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(sed 's/#.*//' "$1")
rm -rf /var/lib/apt/lists/*
