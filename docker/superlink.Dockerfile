# fedsec SuperLink: Flower's SuperLink plus fedsec, whose ServerApp it runs.
#   docker build -f docker/superlink.Dockerfile -t fedsec-superlink .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fedsec ./fedsec
COPY strategies ./strategies
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM python:3.11-slim
# The CPU torch wheel first, so the wheel's torch range does not pull CUDA.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --from=build /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist \
    && useradd --create-home --uid 1000 fedsec
USER 1000:1000
WORKDIR /home/fedsec
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Only the Fleet API listens on the network (9092); the Control and Runtime APIs
# stay on the container's loopback (fedsec.deploy.lan_superlink, README "Deployment
# on a LAN"): registration and `flwr run` happen inside its network namespace.
EXPOSE 9092
ENTRYPOINT ["python", "-m", "fedsec.deploy.lan_superlink", "--disable-runtime-dependency-installation"]
CMD ["--ssl-ca-certfile", "/keys/ca.crt", "--ssl-certfile", "/keys/server.crt", \
     "--ssl-keyfile", "/keys/server.key", "--enable-supernode-auth", \
     "--fleet-host", "0.0.0.0", "--fleet-port", "9092", "--host", "127.0.0.1", "--port", "9093"]
