# fedsec SuperNode for x86-64 NVIDIA GPUs (CUDA 12.4 runtime; torch's CUDA wheel).
#   docker build -f docker/supernode-cuda.Dockerfile -t fedsec-supernode-cuda .
#   docker run --gpus all fedsec-supernode-cuda --superlink ... (as for the CPU image)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fedsec ./fedsec
COPY strategies ./strategies
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
# Ubuntu 22.04 ships Python 3.10; fedsec needs 3.11 (deadsnakes builds for 22.04).
# deadsnakes keeps only its latest build of each package: a version pin would break.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124
COPY --from=build /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist \
    && useradd --create-home --uid 1000 fedsec
USER 1000:1000
WORKDIR /home/fedsec
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
ENTRYPOINT ["flower-supernode"]
