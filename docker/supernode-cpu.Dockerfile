# fedsec SuperNode for CPU machines.
#   docker build -f docker/supernode-cpu.Dockerfile -t fedsec-supernode-cpu .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fedsec ./fedsec
COPY strategies ./strategies
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM python:3.11-slim
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --from=build /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist \
    && useradd --create-home --uid 1000 fedsec
USER 1000:1000
WORKDIR /home/fedsec
# Pass the SuperLink, keys and partition as arguments, e.g.
#   --root-certificates /keys/ca.crt --auth-supernode-private-key /keys/supernode-0.key
#   --superlink superlink:9092 --node-config "partition-id=0 num-partitions=3"
ENTRYPOINT ["flower-supernode"]
