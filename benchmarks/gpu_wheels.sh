#!/usr/bin/env bash
# Downloads into .gpu_wheels/ (git-ignored) the wheels that benchmarks/gpu_check.sh installs on the GPU machine,
# which has no internet. The kernel tests and the benchmarks need nothing beyond that image (Python 3.12, jax
# 0.11.2, flax, optax, orbax-checkpoint, matplotlib, pytest: checked 2026-12-05 by importing the kernel test
# modules, benchmarks/kernel_speed.py and token_reduction.py's speed path and listing what the image lacks), so
# these are tokamax and what `import tokamax` (0.0.17) needs that the image lacks: 12 wheels, about 38 MB (xprof,
# imported by tokamax.benchmarking, is 32 MB of it). Run it here once (it needs PyPI), then carry the folder:
#
#   bash benchmarks/gpu_wheels.sh
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=600)
#
# Without .gpu_wheels the check still runs; the tokamax backend is then skipped ("tokamax is not installed").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
DEST=.gpu_wheels
PACKAGES=(
  "tokamax==0.0.17"
  "qwix==0.1.8"
  "einshape==1.0"
  "immutabledict==4.3.1"
  "pydantic==2.14.4"
  "pydantic-core==2.50.5"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
  "typing-extensions==4.16.0"
  "xprof==2.24.2"
  "fire==0.7.1"
  "termcolor==3.3.0"
)
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" --platform manylinux2014_x86_64 --platform any -d "$DEST" "${PACKAGES[@]}"
ls -la "$DEST"
du -sh "$DEST"
