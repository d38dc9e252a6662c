#!/usr/bin/env bash
# The prepared GPU check: one script, one table (P5 QLoRA/LoRA memory, P8 LoRA tokens/s and MFU beside plain TRL,
# the smoke and demo pipelines end to end, device/driver/torch/CUDA). Budget: at most 8 minutes on one H100;
# nothing is downloaded (random weights of the Llama-3-8B shape from bench/shapes/).
#   bash bench/gpu_check.sh             # on a GPU machine with `pip install -e '.[gpu]'` done
#   bash bench/gpu_check.sh --dry-run   # anywhere (CI): reduced shape on the CPU, proves the script
# The table is printed and written to bench/results/ (gpu_check-<date>.md and .json); commit it with the card named.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
