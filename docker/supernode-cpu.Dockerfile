# fedsec SuperNode for CPU machines.
#   docker build -f docker/supernode-cpu.Dockerfile -t fedsec-supernode-cpu .
# Without a Docker daemon or registry: docker/build.sh (buildah, a local base image).
# Keep every line up to ENV identical to superlink.Dockerfile: the two share those layers.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
# The dependencies alone, so their layer below is rebuilt only when they change.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /requirements.txt
# fedsec/strategies is a link to ../strategies (or absent): copying both keeps it whole.
COPY fedsec ./fedsec
COPY strategies ./strategies
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM ${BASE_IMAGE}
# The CPU torch build first, so the dependencies' torch range does not pull CUDA.
# PyPI's Linux torch wheels are CUDA builds; docker/build.sh, which cannot reach
# download.pytorch.org, sets the index to PyPI and PIP_FIND_LINKS to a local CPU wheel.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY --from=build /requirements.txt /requirements.txt
RUN pip install --no-cache-dir -r /requirements.txt && rm /requirements.txt
COPY --from=build /dist /dist
RUN pip install --no-cache-dir --no-deps /dist/*.whl && rm -rf /dist \
    && useradd --create-home --uid 1000 fedsec
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
USER 1000:1000
WORKDIR /home/fedsec
# Pass the SuperLink, this node's keys (only its own: docker/README.md) and partition, e.g.
#   --root-certificates /keys/ca.crt --auth-supernode-private-key /keys/auth.key
#   --superlink superlink:9092
#   --node-config "partition-id=0 num-partitions=3 signing-key='/keys/signing.pem' signing-identity='client-0'"
# (signing-identity: the name the server registered, client-<i> from `fedsec certs --split`)
ENTRYPOINT ["flower-supernode"]
