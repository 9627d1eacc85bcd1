#!/usr/bin/env bash
# Build the SuperLink and CPU SuperNode images without a Docker daemon or a
# container registry (as root, on Debian/Ubuntu): buildah and podman from apt,
# the Python base image made locally with mmdebstrap (Debian bookworm, Python
# 3.11), then `buildah bud` of docker/superlink.Dockerfile and
# docker/supernode-cpu.Dockerfile. Idempotent: a present base image and cached
# layers are reused (a second run takes seconds).
#
#   sudo docker/build.sh            # -> localhost/fedsec-superlink, localhost/fedsec-supernode-cpu
#
# Environment (all optional):
#   FEDSEC_REBUILD_BASE=1    make the base image again even if present
#   FEDSEC_TORCH_WHEELS=DIR  a folder holding torch-<version>+cpu-cp311-*.whl (default
#                            /opt/wheels); when it has one, torch installs from it and
#                            PyPI. Without one, from the Dockerfiles' default index
#                            (download.pytorch.org/whl/cpu), as elsewhere.
#   FEDSEC_CA_BUNDLE=FILE    CA bundle pip uses inside the build (default: the host's)
#   CONTAINERS_CONF, CONTAINERS_STORAGE_CONF   default to docker/podman/*.conf
#
# Podman storage and settings: docker/podman/. Running the images: docker/README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

die() { echo "build.sh: $*" >&2; exit 2; }
[[ $(uname -s) == Linux ]] || die "needs Linux (buildah/podman), found $(uname -s)"
[[ $(id -u) == 0 ]] || die "needs root (apt-get, mmdebstrap, rootful podman storage)"

SUPERLINK_IMAGE=localhost/fedsec-superlink:latest
SUPERNODE_IMAGE=localhost/fedsec-supernode-cpu:latest
ROOTFS_IMAGE=localhost/fedsec-rootfs:bookworm
BASE_LABEL=org.fedsec.base=mmdebstrap-bookworm
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' docker/supernode-cpu.Dockerfile)
# The name the Dockerfiles' FROM uses (the ARG default), e.g. docker.io/library/python:3.11-slim.
BASE_IMAGE=$(sed -n 's/^ARG BASE_IMAGE=//p' docker/supernode-cpu.Dockerfile)
[[ -n $BASE_IMAGE && -n $TORCH_VERSION ]] || die "docker/supernode-cpu.Dockerfile lacks ARG BASE_IMAGE/TORCH_VERSION"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/docker/podman/containers.conf}
export CONTAINERS_STORAGE_CONF=${CONTAINERS_STORAGE_CONF:-$ROOT/docker/podman/storage.conf}

START=$SECONDS
step_start=$SECONDS
step() { echo "== [build.sh] $*"; step_start=$SECONDS; }
done_step() { echo "   done in $((SECONDS - step_start)) s"; }

# ---- 1. tools ---------------------------------------------------------------
step "tools: buildah podman runc mmdebstrap"
missing=()
for tool in buildah podman runc mmdebstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    # No recommends (slirp4netns, fuse-overlayfs: host networking and the kernel's
    # overlay are used). Exit status 3: the tools could not be installed.
    { apt-get update -q \
        && apt-get install -y -q --no-install-recommends buildah podman runc mmdebstrap uidmap; } \
        || { echo "build.sh: apt-get could not install ${missing[*]}" >&2; exit 3; }
fi
for tool in buildah podman runc mmdebstrap; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool missing after apt-get" >&2; exit 3; }
done
done_step

# ---- 2. base image ----------------------------------------------------------
WORK=$(mktemp -d /var/tmp/fedsec-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
if [[ ${FEDSEC_REBUILD_BASE:-0} == 1 ]]; then
    # Untag only: images built on them keep their layers.
    podman untag "$BASE_IMAGE" >/dev/null 2>&1 || true
    podman untag "$ROOTFS_IMAGE" >/dev/null 2>&1 || true
fi
if podman image exists "$BASE_IMAGE"; then
    # Made by an earlier run, or a real pull of it: either serves.
    echo "== [build.sh] base image $BASE_IMAGE present: reused"
else
    if ! podman image exists "$ROOTFS_IMAGE"; then
        step "base rootfs: mmdebstrap bookworm minbase (python3 3.11)"
        # Explicit mirrors (mmdebstrap reads them from stdin when it is no tty); no
        # Valid-Until check, so snapshot mirrors with an old Release file work too.
        mmdebstrap --variant=minbase --mode=root --format=tar \
            --aptopt='Acquire::Check-Valid-Until "false"' \
            --include=python3,python3-pip,python3-venv,python-is-python3,passwd,ca-certificates \
            bookworm "$WORK/rootfs.tar" \
            "deb http://deb.debian.org/debian bookworm main" \
            "deb http://deb.debian.org/debian bookworm-updates main" \
            "deb http://deb.debian.org/debian-security bookworm-security main" </dev/null
        podman import "$WORK/rootfs.tar" "$ROOTFS_IMAGE" >/dev/null
        rm -f "$WORK/rootfs.tar"
        done_step
    fi
    step "base image $BASE_IMAGE from $ROOTFS_IMAGE"
    # pip may install into the system Python (as in python:3.11-slim): drop PEP 668's marker.
    ctr=$(buildah from --pull-never "$ROOTFS_IMAGE")
    buildah run --isolation chroot "$ctr" -- rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
    buildah config --env LANG=C.UTF-8 --cmd python3 --label "$BASE_LABEL" "$ctr"
    buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
    done_step
fi

# ---- 3. pip inside the build: the host's CA bundle, optionally a local torch wheel
# Bind mounts for RUN steps only (buildah bud -v), over paths the base image has
# (its CA bundle, which Debian's pip reads, and the empty /mnt), so nothing of
# them, not even a mount point, lands in an image.
ca=${FEDSEC_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[[ -f $ca ]] || die "CA bundle $ca not found (set FEDSEC_CA_BUNDLE)"
mounts=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
build_args=()
wheels=${FEDSEC_TORCH_WHEELS:-/opt/wheels}
if compgen -G "$wheels/torch-$TORCH_VERSION+cpu-cp311-*.whl" >/dev/null; then
    echo "== [build.sh] torch $TORCH_VERSION+cpu from $wheels, everything else from PyPI"
    # PyPI's torch==X is a CUDA build; X+cpu from the folder ranks above it.
    mounts+=(-v "$wheels:/mnt:ro")
    build_args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg PIP_FIND_LINKS=/mnt)
else
    echo "== [build.sh] no torch-$TORCH_VERSION+cpu wheel in $wheels: torch from the Dockerfiles' index"
fi

# ---- 4. the images ----------------------------------------------------------
nofile=$(ulimit -Hn)
[[ $nofile == unlimited ]] && nofile=1048576
bud=(buildah bud --isolation chroot --pull-never --network host --layers
    --ulimit "nofile=$nofile:$nofile" --ulimit nproc=32768:32768 "${mounts[@]}" "${build_args[@]}")
# The SuperNode first: the SuperLink shares every layer up to its last few lines.
step "image $SUPERNODE_IMAGE"
"${bud[@]}" -f docker/supernode-cpu.Dockerfile -t "$SUPERNODE_IMAGE" .
done_step
step "image $SUPERLINK_IMAGE"
"${bud[@]}" -f docker/superlink.Dockerfile -t "$SUPERLINK_IMAGE" .
done_step

echo "== [build.sh] total $((SECONDS - START)) s; images:"
for image in "$BASE_IMAGE" "$SUPERNODE_IMAGE" "$SUPERLINK_IMAGE"; do
    printf '   %-45s %5d MB\n' "$image" $(($(podman image inspect --format '{{.Size}}' "$image") / 1000000))
done
