# syntax=docker/dockerfile:1
# One image for the memoplane operator and the node agent; the first argument chooses:
#   docker build -t memoplane:0.1.0 .
#   docker run --rm memoplane:0.1.0 operator [flags]     # memoplane-operator
#   docker run --rm memoplane:0.1.0 agent [flags]        # memoplane-agent (needs privileges: see the chart)
#   docker run --rm memoplane:0.1.0 memoplane --help     # any other command runs as given
#
# The recipe is image/: the Debian package lists, the pinned Python distributions and the scripts.
# `hack/cluster image` builds the same image from Debian's packages without a registry (mmdebstrap +
# umoci) from the same files; image/check.sh, run last by both, fails the build if the installed set
# differs from the recipe's. The base is Debian's minbase of an exact release with Debian's python3.
# Pin it by digest too when you build with registry access:
#   --build-arg DEBIAN_IMAGE=debian:bookworm-slim@sha256:...
# (tests/unit/test_dockerfile.py checks the release and that a digest, if given, is a full sha256).
ARG DEBIAN_IMAGE=debian:bookworm-slim

# ---- build: the package and its dependencies into a virtualenv --------------------------
FROM ${DEBIAN_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,source=image,target=/recipe sh /recipe/apt-install.sh /recipe/apt-build.txt
WORKDIR /src
# What setuptools needs to build the package (pyproject.toml's packages.find and readme).
COPY pyproject.toml README.md ./
COPY memoplane/ memoplane/
COPY operator/ operator/
COPY sandbox-node/ sandbox-node/
# A regular (non-editable) install from the project root, as the package metadata says.
RUN --mount=type=bind,source=image,target=/recipe sh /recipe/venv.sh .

# ---- runtime -------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE}
RUN --mount=type=bind,source=image,target=/recipe sh /recipe/apt-install.sh /recipe/apt-runtime.txt \
 && sh /recipe/runtime.sh
COPY --from=build /opt/memoplane /opt/memoplane
COPY --chmod=0755 image/memoplane-entrypoint /usr/local/bin/memoplane-entrypoint
RUN --mount=type=bind,source=image,target=/recipe sh /recipe/check.sh
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
