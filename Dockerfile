# syntax=docker/dockerfile:1
#
# celery-health-exporter image.
#
#   docker build -t celery-health-exporter \
#     --build-arg VERSION="$(python3 -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')" .
#   docker run --rm -p 9808:9808 -e CELERY_BROKER_URL=amqp://guest:guest@rabbitmq:5672// celery-health-exporter
#
# VERSION must equal the version in pyproject.toml (the single source of truth):
# the build fails otherwise, and tests/deploy/test_dockerfile.py checks the default.

# ---------------------------------------------------------------- builder ---
FROM python:3.11.13-slim-bookworm AS builder

ARG VERSION=0.1.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY celery_health_exporter ./celery_health_exporter

# The same install command as the README and CI: pip builds the wheel and installs it
# (with its runtime dependencies) into /opt/venv, the only thing the final stage takes.
RUN pip install . \
    && test "$(python -c 'import importlib.metadata as m; print(m.version("celery-health-exporter"))')" = "$VERSION" \
    && celery-health-exporter --help > /dev/null \
    && pip uninstall --yes pip setuptools wheel

# ------------------------------------------------------------------ final ---
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="celery-health-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Celery that shows the failures other exporters miss" \
      org.opencontainers.image.source="https://github.com/celery-health-exporter/celery-health-exporter" \
      org.opencontainers.image.url="https://github.com/celery-health-exporter/celery-health-exporter" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

# No compilers, no pip: the base image's own pip/setuptools/wheel go too.
RUN python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 exporter \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin exporter

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Numeric user so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /tmp

EXPOSE 9808

HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9808/healthz', timeout=4)"]

ENTRYPOINT ["celery-health-exporter"]
