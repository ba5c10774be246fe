#!/usr/bin/env bash
# The one-GPU check (tools/gpu_check.py): environment, the vocab-parallel op vs float64 and vs a memcpy, a CUDA-IPC
# round trip without SGLang, the image's and the SGLang venv's NCCL, a 3-step RL run with checkpoint and resume, the
# Qwen path (packed THD, distributed optimizer, compiled kernels, bf16), the GPU tests without SGLang; a JSON report
# in OUT_DIR, within 8 minutes. Exit 0 = nothing failed (a phase the machine cannot run is skipped, with why).
#
#   tools/gpu_check.sh OUT_DIR                 # GPU machine, no registry: gpu-wheelhouse/ (make gpu-wheelhouse)
#                                              # beside this checkout; python3 = the image's Python with CUDA torch
#   tools/gpu_check.sh --cpu-dry-run OUT_DIR   # this machine: the same phases on .venv, CPU-sized, ~2 min
#
# Variables: GPU_CHECK_PYTHON (the interpreter; default python3 on GPU, $VENV/bin/python for the dry run),
# VENV (default .venv), GPU_WHEELHOUSE (default gpu-wheelhouse/). Other options go to tools/gpu_check.py run:
# --budget-s S, --phases a,b, --rl-set key=value, --keep, --venv DIR (see tools/gpu_check.py --help).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dry=()
args=()
for a in "$@"; do
    case "$a" in
        --cpu-dry-run) dry=(--cpu-dry-run) ;;
        -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$a") ;;
    esac
done
if [ "${#args[@]}" -eq 0 ] || [[ "${args[0]}" == -* ]]; then
    echo "usage: tools/gpu_check.sh [--cpu-dry-run] OUT_DIR [options of tools/gpu_check.py run]" >&2
    exit 2
fi

if [ "${#dry[@]}" -gt 0 ]; then
    venv=${VENV:-.venv}
    case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac
    py=${GPU_CHECK_PYTHON:-$venv/bin/python}
    hint="run \`make setup\` first (or set VENV=/path/to/venv or GPU_CHECK_PYTHON)"
else
    py=${GPU_CHECK_PYTHON:-python3}
    hint="set GPU_CHECK_PYTHON to the image's Python (the one with CUDA torch)"
fi
if ! command -v "$py" >/dev/null 2>&1; then
    echo "gpu_check.sh: no python at '$py': $hint" >&2
    exit 2
fi
exec "$py" "$root/tools/gpu_check.py" run "${dry[@]}" "${args[@]}"
