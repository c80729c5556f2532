#!/bin/sh
# Build the vmmigrate image from wheels made here, so `docker build` downloads nothing:
#   scripts/docker-image.sh [TAG]           # BASE=python:3.11-slim by default (a registry)
#   BASE=vmmigrate-base:bookworm scripts/docker-image.sh vmmigrate:test   # a local base
# WHEELS=DIR reuses wheels made earlier (`pip wheel --wheel-dir DIR .`).
# The wheels must match the base's Python (3.11 for both bases above).
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-vmmigrate:latest}
base=${BASE:-python:3.11-slim}
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp -r "$repo/docker" "$ctx/docker"
if [ -n "${WHEELS:-}" ]; then
    cp -r "$WHEELS" "$ctx/wheels"
else
    "$python" -m pip wheel -q --wheel-dir "$ctx/wheels" "$repo"
fi
# the classic builder: Debian's docker.io ships no buildx, and nothing here needs BuildKit
DOCKER_BUILDKIT=0 docker build -t "$tag" --build-arg "BASE=$base" -f "$ctx/docker/Dockerfile" "$ctx"
