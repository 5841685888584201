# syntax=docker/dockerfile:1
FROM python:3.12-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir .

FROM python:3.12-slim
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot only accepts a numeric USER, and
# deploy/kubernetes.yaml runs the pods as the same 10001:10001.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin gateway
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY config ./config
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/app/config/gateway.yaml \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080
# What the default config writes lies under /app/config/var (analytics spool; usage and
# keys.json only without Redis); compose mounts a volume there and runs with a read-only
# root. /var/lib/gateway is where the Kubernetes ConfigMap's config puts the spool.
RUN mkdir -p /app/config/var /var/lib/gateway \
 && chown -R 10001:10001 /app/config /var/lib/gateway
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
CMD ["gateway", "serve"]
