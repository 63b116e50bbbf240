# One image for every role: ingress (default), worker, mock-upstream, ...
#
#   docker build -t llm-broker .
#   docker run --rm -p 8000:8000 -e REDIS_URL=redis://redis-host:6379/0 \
#     -v "$PWD/config.yaml:/etc/llm-broker/config.yaml:ro" \
#     llm-broker ingress --config /etc/llm-broker/config.yaml

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY ingress ./ingress
COPY workers ./workers
COPY llm_broker ./llm_broker

RUN pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install /dist/*.whl

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 llmb \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin llmb \
 && install -d -o 10001 -g 10001 -m 0700 /secrets

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
EXPOSE 8000

ENTRYPOINT ["llm-broker"]
CMD ["ingress"]
