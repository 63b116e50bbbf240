# syntax=docker/dockerfile:1
#
# One image for every role: ingress (the default command), worker, webhooks,
# mock-upstream and the admin commands (keygen, webhook-secret, check-config).
#
#   docker build -t llm-broker .
#   docker run --rm --read-only -p 8000:8000 -e REDIS_URL=redis://redis-host:6379/0 \
#     -v "$PWD/config.yaml:/etc/llm-broker/config.yaml:ro" \
#     llm-broker ingress --config /etc/llm-broker/config.yaml
#   docker run --rm --read-only llm-broker worker --provider openai --config ...
#
# The runtime stage holds the Python runtime and one virtualenv (/opt/venv)
# with the project and its dependencies, installed from wheels only: no
# compiler, no pip in the venv, no sources. It writes nothing outside mounted
# volumes, so it runs with a read-only root filesystem (mount an emptyDir on
# /tmp only for `llm-broker dev`, which writes its temporary config there).
#
# No HEALTHCHECK: worker and webhooks processes serve no HTTP port unless
# given --metrics-port, so one image-wide check would mark them unhealthy.
# Health is the orchestrator's: Kubernetes probes /health (liveness) and
# /ready (readiness) on ingress; docker-compose.yml declares its own checks.

# Both stages must use the same base: the venv's interpreter is a symlink to
# the base image's /usr/local/bin/python3.
#
# Pinned to a full version tag. To pin the content too, append the index
# digest (the multi-arch manifest list, not one platform's manifest):
#   docker buildx imagetools inspect python:3.12.12-slim-trixie   # "Digest: sha256:..."
#   ARG PYTHON_IMAGE=python:3.12.12-slim-trixie@sha256:<that digest>
# and let Dependabot or Renovate (docker ecosystem) bump tag and digest
# together; a digest left alone never receives Debian's security fixes.
ARG PYTHON_IMAGE=python:3.12.12-slim-trixie

# ---------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# README.md is the package's long description (pyproject.toml `readme`).
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY ingress ./ingress
COPY workers ./workers
COPY llm_broker ./llm_broker

# The project's wheel, then a venv without pip holding it and its
# dependencies, from binary wheels only: a dependency without a wheel for
# the target platform fails the build here instead of needing a compiler.
# pip byte-compiles what it installs, so nothing is compiled at run time.
# With the `s3` extra (aiobotocore: pure-Python wheels but for wrapt's, which
# ships wheels for both platforms), so the image can keep files in S3
# (`files.backend: s3`), and the `vertex` and `bedrock` extras (google-auth,
# botocore) for those providers. The wheel is named by a direct reference: `set --`
# expands the glob first (`/dist/*.whl[s3]` would be a bracket expression).
RUN pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip /opt/venv \
 && set -- /dist/*.whl \
 && pip --python /opt/venv/bin/python install --only-binary=:all: "llm-broker[s3,vertex,bedrock] @ file://$1"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# uid/gid 10001, as the Kubernetes manifests' runAsUser expect. /secrets and
# its folders are owned by it so that the named volumes mounted there (where
# docker-compose.yml's `secrets` service writes the webhook signing secrets and
# Grafana's admin password) are writable; Grafana (another uid) reads its file.
# /var/lib/llm-broker/files likewise: the file store's directory (docker-compose.yml
# shares one volume there between ingress and the workers).
RUN groupadd --system --gid 10001 llmb \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin llmb \
 && install -d -o 10001 -g 10001 -m 0700 /secrets /secrets/webhooks \
 && install -d -o 10001 -g 10001 -m 0755 /secrets/grafana \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/llm-broker /var/lib/llm-broker/files

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
EXPOSE 8000

# Last, so that build arguments that differ between builds (the CI scan build
# and the release build) change only the image config, never a layer.
# docker/metadata-action sets these labels too, from the git ref.
ARG VERSION=0.0.0-dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="llm-broker" \
      org.opencontainers.image.description="Queue-based LLM gateway: OpenAI-compatible ingress, Redis Streams, provider worker pools" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"

ENTRYPOINT ["llm-broker"]
CMD ["ingress"]
