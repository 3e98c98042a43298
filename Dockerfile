# syntax=docker/dockerfile:1
# One image for the memoplane operator and the node agent; the first argument chooses:
#   docker build -t memoplane:0.1.0 .
#   docker run --rm memoplane:0.1.0 operator [flags]     # memoplane-operator
#   docker run --rm memoplane:0.1.0 agent [flags]        # memoplane-agent (needs privileges: see the chart)
#   docker run --rm memoplane:0.1.0 memoplane --help     # any other command runs as given
#
# The base is pinned to an exact Python and Debian release. Pin it by digest too when you
# build with registry access:  --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:...
# (the digest cannot be looked up where this file was written; tests/unit/test_dockerfile.py
# checks that the tag is an exact release and that a digest, if given, is a full sha256).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- build: the package and its dependencies into a virtualenv --------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A compiler, in case a dependency has no wheel for the platform (build stage only).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/memoplane
WORKDIR /src
# What setuptools needs to build the package (pyproject.toml's packages.find and readme).
COPY pyproject.toml README.md ./
COPY memoplane/ memoplane/
COPY operator/ operator/
COPY sandbox-node/ sandbox-node/
# A regular (non-editable) install from the project root, as the package metadata says.
RUN /opt/memoplane/bin/pip install . \
 && /opt/memoplane/bin/memoplane --version \
 && /opt/memoplane/bin/python -c "import memoplane_operator, memoplane_agent, memoplane.sandbox.seccomp_filter"

# ---- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# libseccomp2: the sandbox compiles its per-job seccomp filter with it (pyseccomp loads it).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libseccomp2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 memoplane \
 && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --shell /usr/sbin/nologin memoplane
COPY --from=build /opt/memoplane /opt/memoplane
COPY --chmod=0755 <<'EOF' /usr/local/bin/memoplane-entrypoint
#!/bin/sh
# operator | agent | any command
set -e
case "$1" in
  operator) shift; exec memoplane-operator "$@" ;;
  agent) shift; exec memoplane-agent "$@" ;;
  ""|-h|--help) echo "usage: IMAGE operator|agent [flags]  |  IMAGE COMMAND [ARGS]"; exec memoplane --help ;;
  *) exec "$@" ;;
esac
EOF
ENV PATH=/opt/memoplane/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Non-root by default (the operator, MinIO-free tools). The agent's pod runs it as uid 0 with
# the capabilities the sandbox needs; the chart sets that (charts/memoplane/values.yaml).
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 8081 9090
ENTRYPOINT ["/usr/local/bin/memoplane-entrypoint"]
CMD ["--help"]
