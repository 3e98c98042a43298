#!/bin/sh
# The virtualenv /opt/memoplane: Debian's python3, the project and its dependencies pinned by requirements.lock.
# $@: what pip installs (the project root `.`, or a wheel and `--no-index --find-links DIR`).
set -eu
recipe="$(dirname "$0")"
python3 -m venv /opt/memoplane
/opt/memoplane/bin/pip install --no-cache-dir --disable-pip-version-check -c "$recipe/requirements.lock" "$@"
/opt/memoplane/bin/memoplane --version
/opt/memoplane/bin/python -c "import memoplane_operator, memoplane_agent, memoplane.sandbox.seccomp_filter"
find /opt/memoplane -name __pycache__ -type d -prune -exec rm -rf {} +
