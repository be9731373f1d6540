#!/usr/bin/env bash
# Every GPU check of ndrope's Triton kernel, in one command, on a machine with one CUDA GPU:
#   1. python -m pytest -m gpu: the kernel against the torch formula and float64 on CUDA, torch.compile
#      (fullgraph, dynamic) of RoPE ViTs at three resolutions, a Lightning fit in bf16-mixed;
#   2. python -m bench --device cuda --skip-vit: GB/s and time against the copy bound, forward and
#      forward+backward, ViT-B/16, video and LLM shapes, bfloat16 and float32, beside the peers;
#   3. python -m bench --device cuda --skip-rotary: a compiled ViT-B/16 training step, ndrope against timm's formula.
# Meant to finish in under 8 minutes: each part has its own time limit (180 + 150 + 150 s), so one slow
# part cannot take the others' results with it. Logs and JSON go to the folder given as the first
# argument (default runs/gpu-check/, ignored by git).
#   usage: scripts/gpu_check.sh [results-folder]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device is visible: nothing to check')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"

status=0
run() {  # run NAME SECONDS COMMAND...: the command's output in $out/NAME.txt, its status remembered
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local code=${PIPESTATUS[0]}
    [ "$code" -eq 124 ] && echo "== $name: stopped after ${limit}s" | tee -a "$out/$name.txt"
    [ "$code" -ne 0 ] && status=1
    echo "== $name: exit $code"
}

run pytest 180 python -m pytest -m gpu -q -p no:cacheprovider -ra
run bench-rotary 150 python -m bench --device cuda --skip-vit --repeats 10 --out "$out/bench-rotary.json"
run bench-vit 150 python -m bench --device cuda --skip-rotary --vit-repeats 5 --out "$out/bench-vit.json"
exit $status
