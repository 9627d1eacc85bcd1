# fedsec SuperNode for NVIDIA Jetson (arm64, JetPack 6 / L4T r36).
#   docker build --platform linux/arm64 -f docker/supernode-jetson.Dockerfile \
#     --build-arg TORCH_WHEEL=<url of a cp311 aarch64 torch wheel for JetPack 6> .
#   docker run --runtime nvidia fedsec-supernode-jetson --superlink ...
# NOT BUILT OR RUN anywhere yet: no Jetson, no arm64 builder, and this repository's
# CI reaches no image registry (nvcr.io, docker.io); only hadolint checks this file
# (tests/test_docker.py). Every FROM is fully qualified (podman and buildah need it).
FROM docker.io/library/python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
# fedsec/strategies is a link to ../strategies (or absent): copying both keeps it whole.
COPY fedsec ./fedsec
COPY strategies ./strategies
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM nvcr.io/nvidia/l4t-jetpack:r36.2.0
# L4T r36 is Ubuntu 22.04 with Python 3.10; fedsec needs 3.11, and torch must be a
# Jetson (CUDA, aarch64) build for that Python: pass its wheel as TORCH_WHEEL.
ARG TORCH_WHEEL
# Build-time only (ARG, not ENV): no apt prompt (tzdata) stops the build.
ARG DEBIAN_FRONTEND=noninteractive
# deadsnakes keeps only its latest build of each package: a version pin would break.
# hadolint ignore=DL3008
RUN test -n "$TORCH_WHEEL" \
    && apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
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
# Arguments as for the CUDA image (keys/supernode-<i> mounted read-only at /keys).
ENTRYPOINT ["flower-supernode"]
