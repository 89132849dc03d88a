#!/usr/bin/env bash
# The GPU check, one command for one CUDA GPU (H100/H200 class), in under 8 minutes:
#   1. the gpu-marked tests (tests/gpu: a CUDA EBFT block step against the CPU, masks exact on CUDA,
#      bf16 autocast, --compile);
#   2. bench/gpu_check.py: a whole ebft prune run at the paper's budget (256 x 1024 tokens, 10 epochs) on a
#      SmolLM2-shaped model, and a Llama-2-7B-shaped block at the paper's batch with the full-7B time it implies.
# Results go to $OUT (gpu_tests.log, gpu_check.json); text comes from EBFT_DATA_DIR (default .gpu-data, a
# copy of ../shared/data/{c4,wikitext2} carried along), else CPython's documentation.
#
#   mkdir -p .gpu-data && cp -r ../shared/data/c4 ../shared/data/wikitext2 .gpu-data/   # once, here
#   bash bench/gpu_check.sh                                                               # there
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
DATA=${EBFT_DATA_DIR:-.gpu-data}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
$PY -m pytest -q -p no:cacheprovider tests/gpu -rs 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
data=()
[ -f "$DATA/c4/train.jsonl" ] && data=(--data-dir "$DATA")
$PY bench/gpu_check.py --device cuda "${data[@]}" > "$OUT/gpu_check.json" 2> "$OUT/gpu_check.log"
check=$?
tail -n 5 "$OUT/gpu_check.log"
cat "$OUT/gpu_check.json"
echo "gpu tests exit $tests, gpu_check exit $check, $(( $(date +%s) - start )) s"
exit $(( tests != 0 || check != 0 ))
