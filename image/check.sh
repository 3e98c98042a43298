#!/bin/sh
# The runtime image has exactly the recipe's installed set: these Debian packages (names) and these Python
# distributions (with versions). Both builders run it last; a difference fails the build with the diff.
set -eu
recipe="$(dirname "$0")"
fail=0
dpkg-query -W -f '${Package}\n' | sort >/tmp/dpkg-installed
if ! diff -u "$recipe/dpkg-packages.txt" /tmp/dpkg-installed; then
  echo "image/check.sh: the Debian packages differ from image/dpkg-packages.txt (fix the apt lists, or run: hack/cluster image --relock)" >&2
  fail=1
fi
/opt/memoplane/bin/pip freeze --all --disable-pip-version-check --exclude memoplane | sort >/tmp/pip-installed
if ! grep -v '^#' "$recipe/requirements.lock" | sort | diff -u - /tmp/pip-installed; then
  echo "image/check.sh: the Python distributions differ from image/requirements.lock (run: hack/cluster image --relock)" >&2
  fail=1
fi
rm -f /tmp/dpkg-installed /tmp/pip-installed
exit "$fail"
