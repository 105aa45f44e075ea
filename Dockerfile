#
# celery-health-exporter image.
#
#   docker build -t celery-health-exporter \
#     --build-arg VERSION="$(python3 -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')" .
#   docker run --rm -p 9808:9808 -e CELERY_BROKER_URL=amqp://guest:guest@rabbitmq:5672// celery-health-exporter
#
# VERSION must equal the version in pyproject.toml (the single source of truth):
# the build fails otherwise, and tests/deploy/test_dockerfile.py checks the default.
# The Python dependencies come pinned and hash-checked from requirements.lock; after a change
# of pyproject.toml's requirements, regenerate it with deploy/dev/lock-requirements.sh.
# Without access to a registry (as in CI): deploy/dev/start-docker.sh starts an engine,
# deploy/dev/build-base-image.sh makes a stand-in for the base image, then
# `DOCKER_BUILDKIT=0 docker build .` (tests/image/ does all three).

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
# The pinned, hashed dependencies first (their layer is reused while only the code changes),
# then the project itself from the same source tree `pip install .` takes in the README and CI:
# pip builds the wheel (with the locked setuptools and wheel, no build isolation) and installs it
# into /opt/venv, the only thing the final stage takes. Every distribution in the venv comes from
# requirements.lock (deploy/dev/lock-requirements.sh regenerates it; tests keep it in sync with
# pyproject.toml and audit it); `pip check` proves the lock satisfies the project.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY celery_health_exporter ./celery_health_exporter
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
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

# `celery-health-exporter healthcheck` reads the exporter's own flags and environment (PID 1's),
# so it follows --listen-address and --web-config-file (https with TLS), and asks /readyz: healthy
# while the exporter is connected to its broker and serving. A check every 15 s is cheap (one
# short-lived Python process); the start period covers a slow first broker connection; three
# failures in a row (45 s) turn the container unhealthy. `docker run --health-interval` etc.
# override these values.
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["celery-health-exporter", "healthcheck"]

ENTRYPOINT ["celery-health-exporter"]
