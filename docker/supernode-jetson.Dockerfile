# fedsec SuperNode for NVIDIA Jetson (arm64, JetPack 6 / L4T r36). Unverified: no
# Jetson and no Docker engine were available where it was written (see README.md).
#   docker build --platform linux/arm64 -f docker/supernode-jetson.Dockerfile \
#     --build-arg TORCH_WHEEL=<url of a cp311 aarch64 torch wheel for JetPack 6> .
#   docker run --runtime nvidia fedsec-supernode-jetson --superlink ...
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fedsec ./fedsec
COPY strategies ./strategies
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM nvcr.io/nvidia/l4t-jetpack:r36.2.0
# L4T r36 is Ubuntu 22.04 with Python 3.10; fedsec needs 3.11, and torch must be a
# Jetson (CUDA, aarch64) build for that Python: pass its wheel as TORCH_WHEEL.
ARG TORCH_WHEEL
# deadsnakes keeps only its latest build of each package: a version pin would break.
# hadolint ignore=DL3008
RUN test -n "$TORCH_WHEEL" \
    && apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "$TORCH_WHEEL"
ENV PATH=/opt/venv/bin:$PATH
COPY --from=build /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist \
    && useradd --create-home --uid 1000 fedsec
USER 1000:1000
WORKDIR /home/fedsec
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
ENTRYPOINT ["flower-supernode"]
