#!/usr/bin/env bash
# Wheels for the lent GPU machines, which have no internet and their own jax: the packages
# their image lacks (grain, array_record, ml_collections, tensorboardX, portpicker at the last
# look) and the small pure-Python ones those need, into wheelhouse/ (git-ignored; carry it with
# the tree). benchmarks/gpu_check.sh installs from it whatever the machine cannot import.
#
#   bash benchmarks/make_wheelhouse.sh                 # wheels for this Python's version
#   PYTHON_VERSIONS="3.11 3.12" bash benchmarks/make_wheelhouse.sh
#
# Run where PyPI is reachable. Versions follow constraints.txt where it pins them. jax, jaxlib,
# numpy, scipy and the CUDA libraries are never downloaded: the machine's own are used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
out=wheelhouse
mkdir -p "$out"
versions="${PYTHON_VERSIONS:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
packages=(
  grain array_record ml_collections tensorboardX portpicker
  # what those import that a bare jax image may lack
  cloudpickle dm-tree etils more-itertools protobuf absl-py typing-extensions
  importlib_resources zipp psutil
)
for version in $versions; do
  for package in "${packages[@]}"; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$out" \
      --python-version "$version" --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 --platform any \
      -c constraints.txt "$package"
  done
done
ls "$out"
du -sh "$out"
