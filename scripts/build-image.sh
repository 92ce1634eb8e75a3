#!/usr/bin/env bash
# Build the container image from deploy/Dockerfile without Docker: Debian's podman and runc,
# and a Python base made with mmdebstrap (no registry but Debian's and PyPI is needed).
#
#   scripts/build-image.sh [--tag TAG] [--dockerfile PATH]     (default tag localhost/mailpool:dev)
#
# Steps, each logged to build/image/<step>.log:
#   base    mmdebstrap: Debian 12 minbase + python3, venv, pip, CA certificates, without
#           Debian's EXTERNALLY-MANAGED marker (pip installs into the image's system Python,
#           as it does in python:3.11-slim); kept in build/image/ and reused for 7 days
#   import  podman import of that tarball as localhost/mailpool-base:bookworm
#   build   podman build --build-arg PYTHON_IMAGE=localhost/mailpool-base:bookworm, with the
#           host's CA bundle mounted read-only for pip, runc and explicit ulimits (the
#           defaults fail on some VMs)
# A failed step prints the end of its log and one line naming it; exit status 1 (2 when
# a tool is missing or an option is wrong).  Runs as root (what CI does); a lock makes a
# second build wait for the first, so a build started early (make image) is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=localhost/mailpool:dev
DOCKERFILE=deploy/Dockerfile
DIR=build/image
BASE_IMAGE=localhost/mailpool-base:bookworm
BASE_TAR=$DIR/base-bookworm.tar
BASE_MAX_AGE_DAYS=7
MIRROR=${MAILPOOL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
# These VMs' default limits are too small or unset for the containers; the same as podman run.
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)

usage_error() {
  echo "build-image: $1" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --tag) [ $# -ge 2 ] || usage_error "--tag needs a value"; TAG=$2; shift 2 ;;
    --dockerfile) [ $# -ge 2 ] || usage_error "--dockerfile needs a value"; DOCKERFILE=$2; shift 2 ;;
    *) usage_error "unknown argument $1 (usage: scripts/build-image.sh [--tag TAG] [--dockerfile PATH])" ;;
  esac
done
[ -f "$DOCKERFILE" ] || usage_error "no Dockerfile at $DOCKERFILE"
for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null || usage_error "$tool is not installed (MAILPOOL_SETUP_DEV=1 scripts/setup.sh, or apt-get install podman runc mmdebstrap)"
done
[ -f "$CA_BUNDLE" ] || usage_error "no CA bundle at $CA_BUNDLE (apt-get install ca-certificates): pip in the build needs it"

mkdir -p "$DIR"
exec 9>"$DIR/lock"
flock 9

# step NAME COMMAND...: run COMMAND with its output in $DIR/NAME.log; stop the script if it fails.
step() {
  local name=$1 log="$DIR/$1.log" started=$SECONDS status=0
  shift
  "$@" >"$log" 2>&1 </dev/null || status=$?
  if [ "$status" != 0 ]; then
    tail -n 20 "$log" >&2
    echo "build-image: step '$name' failed (exit $status): $* (log: $log)" >&2
    exit 1
  fi
  echo "build-image: $name done in $((SECONDS - started)) s" >&2
}

make_base() {
  local partial=${BASE_TAR%.tar}.partial.tar  # mmdebstrap picks the format by the suffix
  rm -f "$partial"
  mmdebstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    bookworm "$partial" \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
    "deb ${MIRROR%/debian}/debian-security bookworm-security main"
  mv "$partial" "$BASE_TAR"
}

# The base is made again when missing or older than BASE_MAX_AGE_DAYS (security updates).
if [ -n "$(find "$BASE_TAR" -mtime -"$BASE_MAX_AGE_DAYS" 2>/dev/null)" ]; then
  echo "build-image: base $BASE_TAR reused" >&2
else
  step base make_base
fi
# Imported again only when the tarball is newer than the import (podman keeps its layer
# cache for an unchanged base, so an unchanged tree builds in seconds).
if ! podman image exists "$BASE_IMAGE" || [ "$BASE_TAR" -nt "$DIR/imported" ]; then
  step import podman import "$BASE_TAR" "$BASE_IMAGE"
  touch "$DIR/imported"
fi
step build podman build --format docker --network=host --runtime runc "${ULIMITS[@]}" \
  --volume "$CA_BUNDLE:$CA_BUNDLE:ro" --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
  --ignorefile deploy/Dockerfile.dockerignore -f "$DOCKERFILE" -t "$TAG" .
echo "build-image: built $TAG" >&2
