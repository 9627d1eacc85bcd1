# fedsec SuperNode for x86-64 NVIDIA GPUs: torch 2.13.0's CUDA 12.6 build (cu126).
#   docker build -f docker/supernode-cuda.Dockerfile -t fedsec-supernode-cuda .
#   docker run --gpus all fedsec-supernode-cuda --superlink ... (as for the CPU image)
# NOT BUILT in this repository's CI: the machines there reach no image registry
# (docker.io) and not download.pytorch.org, so only hadolint checks this file
# (tests/test_docker.py). Every FROM is fully qualified (podman and buildah need it).
#
# torch 2.13.0 ships CUDA 12.6, 13.0 and 13.2 builds (no cu124). cu126 runs on
# drivers >= 560 (and older 525+ ones through CUDA's minor-version compatibility);
# for 13.x, change TORCH_INDEX and the base image's CUDA version together.
# The base is NVIDIA's `base` flavour: torch's CUDA wheels bring CUDA, cuDNN,
# cuBLAS and NCCL as pip dependencies (nvidia-*-cu12), so the base needs only
# the settings the NVIDIA container runtime reads (NVIDIA_VISIBLE_DEVICES,
# NVIDIA_DRIVER_CAPABILITIES); the cudnn-runtime flavour would add a second,
# unused copy of those libraries (several GB).
FROM docker.io/library/python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
# fedsec/strategies is a link to ../strategies (or absent): copying both keeps it whole.
COPY fedsec ./fedsec
COPY strategies ./strategies
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM docker.io/nvidia/cuda:12.6.3-base-ubuntu22.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
# Build-time only (ARG, not ENV): no apt prompt (tzdata) stops the build.
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu 22.04 ships Python 3.10; fedsec needs 3.11 (deadsnakes builds for 22.04).
# deadsnakes keeps only its latest build of each package: a version pin would break.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CUDA index, so the wheel's torch range does not pull another build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX"
COPY --from=build /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist \
    && useradd --create-home --uid 1000 fedsec
USER 1000:1000
WORKDIR /home/fedsec
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Pass the SuperLink, this node's keys and partition as arguments, e.g. with
# keys/supernode-0 (fedsec certs --split) mounted read-only at /keys:
#   --root-certificates /keys/ca.crt --auth-supernode-private-key /keys/auth.key
#   --superlink superlink:9092 --node-config "partition-id=0 num-partitions=3
#   signing-key='/keys/signing.pem' signing-identity='client-0'"
ENTRYPOINT ["flower-supernode"]
