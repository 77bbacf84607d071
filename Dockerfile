# One image for every role of apipool; the first argument picks it:
#
#   docker run --rm apipool:dev --version
#   args: ["operator"]                                  the kopf operator (deploy/operator.yaml)
#   args: ["slot", "--pool", "P", "--slot", "I", ...]   a slot pod (built by the operator)
#   args: ["standin", "--limit", "N", ...]              the stand-in API (tests/e2e)
#   args: ["submit", ...], ["stats", ...]               the CLI
#
# Build: `make image` (docker build -t apipool:dev .).
#
# It runs as uid/gid 10001 (the runAsUser of the slot and operator pods) and
# with a read-only root filesystem: at run time nothing is written to disk (the
# venv carries its compiled bytecode, and PYTHONDONTWRITEBYTECODE stops Python
# from trying to add more). kopf needs a passwd entry for its uid (it names
# itself after the user), which is why the user is created below and not merely
# set by number.

# Pinned to a patch release of Python 3.11 (the project's minimum); the builder
# and the final stage must use the same base, since the venv's interpreter is a
# symlink to the base image's /usr/local/bin/python3.11.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# -- builder: a wheel of the project, installed with the slot and operator extras into /opt/venv
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# Only what the wheel is built from (see .dockerignore): the package metadata,
# the README (the package's long description) and the package itself.
COPY pyproject.toml README.md ./
COPY operator ./operator

RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install "$(ls /wheels/apipool-*.whl)[slot,operator]" \
 && /opt/venv/bin/pip uninstall --yes pip setuptools \
 && /opt/venv/bin/apipool --version

# -- final: the slim base, the venv, a non-root user; no compiler, no pip in the venv
FROM ${PYTHON_IMAGE}

ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown

LABEL org.opencontainers.image.title="apipool" \
      org.opencontainers.image.description="Use a paid external API at exactly its concurrent-connection limit: the operator, the slot workers and the CLI." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# --no-log-init: no lastlog/faillog entries (sparse files that bloat the layer).
RUN groupadd --gid 10001 apipool \
 && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin apipool

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /

ENTRYPOINT ["apipool"]
CMD ["--help"]
