# syntax=docker/dockerfile:1
FROM python:3.12-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir .

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home /app gateway
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY config ./config
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/app/config/gateway.yaml \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080
RUN mkdir -p /app/config /app/var && chown -R gateway /app/config /app/var
USER gateway
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
CMD ["gateway", "serve"]
