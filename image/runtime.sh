#!/bin/sh
# The runtime image's user: memoplane, uid and gid 65532, no home, no shell.
set -eu
groupadd --system --gid 65532 memoplane
useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --shell /usr/sbin/nologin memoplane
