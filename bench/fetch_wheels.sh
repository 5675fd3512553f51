#!/usr/bin/env bash
# The packages that the GPU image lacks and the trainer needs (hydra-core, omegaconf, antlr4,
# PuLP, highspy), as wheels for its Python 3.12 in .whl/ (git-ignored through .git/info/exclude).
# Run it here, before a device call of `bash bench/gpu_check.sh trainer` that carries [".whl"].
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl hydra-core==1.3.8 omegaconf==2.3.1 pulp==3.3.2 highspy==1.16.0
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist only: pure Python, built here
ls -la .whl
