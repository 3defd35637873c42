#!/usr/bin/env bash
# The accelerator campaign, one command: the Pallas upsampling compiled for the backend and checked for
# equality (values and gradients); conv and upsampling implementations per layer shape of nnU-Net's 3D
# full-resolution network; its train step (128^3, batch 2, deep supervision) in float32 and bfloat16
# against plain Flax and, where torch is installed, PyTorch nnU-Net with AMP; the fraction of the bf16
# matmul peak measured in the same run; a 512x512x300 CT predicted with 8 mirrorings. Written to finish
# in under 8 minutes on one H200 (--budget-s, default 360 s: no new work starts after that).
#
#   bash benchmarks/accelerator.sh              # the campaign on JAX's default backend
#   bash benchmarks/accelerator.sh --dry-run    # every section at toy sizes on any backend (CI: CPU)
#   bash benchmarks/accelerator.sh --help       # --out --runs --ct-runs --budget-s --sections --no-torch
#
# Needs medseg-jax installed (pip install -e .); torch and dynamic-network-architectures are optional.
# Runs from the repository root (a relative --out is taken from there) and writes
# benchmarks/results/accelerator-<backend>-<UTC time>.json and .md (dry runs: accelerator-<backend>-dry-run-...).
# Exit status: 0 when every section ran and every equality check passed, 1 otherwise, 2 for bad flags.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# JAX reserves 75% of a GPU's memory at start by default: leave room for the PyTorch baseline, which
# runs in the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.7}"
exec "${PYTHON:-python}" -m medseg_jax.bench.accelerator "$@"
