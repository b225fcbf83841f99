#!/usr/bin/env bash
# The prepared GPU check: one command on a machine with one NVIDIA GPU (H100/H200: about 5 minutes
# after the install). It makes a virtualenv from this checkout with pyproject's version RANGES (no
# CPU lock, so pip's torch is a CUDA build), then runs bench/gpu_check.py: the device and a
# CUDA-vs-CPU parity forward, the unit tests with the GPU visible, a bf16 DeepSpeed ZeRO-2 training
# run of a t5-small-shaped EmbSum (random init, 200 steps, 1 worker) printing examples/s, tokens/s
# and MFU, the embed job on a GPU actor, and the Serve scorer on a GPU replica answering requests.
#
#   bash bench/gpu_check.sh                      # the GPU check (venv: .venv-gpu)
#   bash bench/gpu_check.sh --cpu                # dry run: same entry points, CPU, tiny model (venv: .venv)
#   bash bench/gpu_check.sh --find-links DIR --no-index    # install from local wheels (no network)
#   bash bench/gpu_check.sh -- --stages device,train --steps 100   # after --: bench.gpu_check's options
#
# Where the machine's python3 already has a CUDA torch inside pyproject's range, the venv sees it
# (--system-site-packages) and pip keeps it instead of downloading a few GB of CUDA wheels.
# Results: bench/results/gpu_check.json; the log on stdout.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."
device=cuda
venv=""
install=1
pip_args=()
check_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) device=cpu ;;
    --venv) venv="$2"; shift ;;
    --no-install) install=0 ;;
    --find-links) pip_args+=(--find-links "$2"); shift ;;
    --no-index) pip_args+=(--no-index) ;;
    -h|--help) usage; exit 0 ;;
    --) shift; check_args+=("$@"); break ;;
    *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

python=${PYTHON:-python3}
t0=$(date +%s)
if [ "$device" = cpu ]; then
  venv=${venv:-.venv}
  # The dry run uses the dev environment (CPU torch pinned by requirements/lock-cpu.txt).
  if [ "$install" = 1 ]; then make install; fi
else
  venv=${venv:-.venv-gpu}
  if [ "$install" = 1 ]; then
    if [ ! -x "$venv/bin/python" ]; then
      site=()
      if "$python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda and (2, 4) <= tuple(map(int, torch.__version__.split(".")[:2])) < (3, 0) else 1)' 2>/dev/null; then
        site=(--system-site-packages)
        echo "[gpu-check] reusing the CUDA torch of $python ($("$python" -c 'import torch; print(torch.__version__)'))"
      fi
      "$python" -m venv ${site[@]+"${site[@]}"} "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --upgrade pip ${pip_args[@]+"${pip_args[@]}"}
    "$venv/bin/python" -m pip install --quiet ${pip_args[@]+"${pip_args[@]}"} -e '.[dev]'
  fi
  "$venv/bin/python" -c 'import torch; assert torch.cuda.is_available(), f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
echo "[gpu-check] environment ready in $(( $(date +%s) - t0 ))s ($venv)"
export PYTHONUNBUFFERED=1
exec "$venv/bin/python" -m bench.gpu_check --device "$device" ${check_args[@]+"${check_args[@]}"}
