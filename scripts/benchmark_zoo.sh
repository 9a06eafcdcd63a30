#!/usr/bin/env bash
# Train-step tokens/s, MFU and memory of one preset per model family on this machine's first device:
# bf16 compute, fp32 parameters and AdamW state, 4 x 2048 tokens per step, no remat, one device.
#   bash scripts/benchmark_zoo.sh            (the README's GPU figures; about 1 minute per model on an H100)
#   bash scripts/benchmark_zoo.sh pythia-14m (any presets)
set -uo pipefail
cd "$(dirname "$0")/.."
models=("$@")
# Gemma 3 and Llama-3.2-1B in the loop layout: scanned, Gemma 3's per-layer windows take the attention path
# that keeps the scores, and Llama's stack runs slower and holds more memory on one GPU (README results).
[ ${#models[@]} -eq 0 ] && models=(SmolLM2-360M Qwen3-0.6B "Llama-3.2-1B --config.train.scan_layers=False"
  "gemma-3-1b-it --config.train.scan_layers=False"
  "Mixtral-8x7B-v0.1 --config.model.n_layer=1")
for m in "${models[@]}"; do
  # shellcheck disable=SC2086  # a model may carry its own overrides
  set -- $m
  python3 scripts/benchmark.py --config configs/llama_1b.py --config.model.name="$1" "${@:2}" \
    --config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tensor=1 --config.train.remat=none \
    --config.train.global_batch_size=4 --config.data.seq_len=2048 --steps=5 --warmup=1 \
    || echo "$1: failed"
done
