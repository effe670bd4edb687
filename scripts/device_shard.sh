#!/usr/bin/env bash
# One shard command of the `cifar10` study on a lent GPU machine (its own PyTorch; no papermill or Jupyter needed).
#   bash scripts/device_shard.sh STAGES SEEDS [BUNDLE ...]
# e.g. bash scripts/device_shard.sh base,atypical,gamma,posthoc_base 0
#      bash scripts/device_shard.sh um,posthoc_um 0 docs/results/cifar10/bundles/cifar10__{base,gamma}__seed0.tar.gz
# Reads the data from .device/data and the checkpoints from .device/models (scripts/device_data.sh, carried), writes
# one bundle per (stage, seed) and the log to $OUT (the device tool brings them back), and prints the GPU, torch
# and the time of each stage. OOD_SET may hold profile overrides, e.g.
# OOD_SET='--set=train.epochs=2 --set=seeds=[0]' (split at spaces, never globbed). MODELS_ONLY=1 only re-trains (or
# installs) and checks the models the stages start from,
# writing no bundle: the first of two commands on one warm machine where re-training the base and the stage do not
# fit in one command.
set -euo pipefail
cd "$(dirname "$0")/.."
stages="$1"; seeds="$2"; shift 2
case "${MODELS_ONLY:-0}" in 0|1) ;; *) echo "MODELS_ONLY must be 0 or 1, not '$MODELS_ONLY'" >&2; exit 2 ;; esac
out="${OUT:-results/cifar10/bundles}"
mkdir -p "$out"
# the repository root on the path (nothing is pip-installed there), for worker processes too
export OOD_DATA_ROOT="$PWD/.device/data" OOD_MODELS_ROOT="$PWD/.device/models" OOD_DATA_DIR="${TMPDIR:-/tmp}/ood_data" \
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
  CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"  # deterministic cuBLAS (ood_lib.train)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
inputs=()
[ $# -gt 0 ] && inputs=(--inputs "$@")
only=(); log="log-${stages//,/-}-seed${seeds//,/-}"
[ "${MODELS_ONLY:-0}" = 1 ] && only=(--models-only) && log="$log-models"
set -f  # OOD_SET is split at spaces, never globbed
python3 -m ood_lib.reproduce --profile cifar10 ${OOD_SET:-} --stages "$stages" --seeds "$seeds" --bundle-dir "$out" \
  "${inputs[@]}" "${only[@]}" 2>&1 | tee "$out/$log.txt"
