#!/bin/bash
# The GPU checks still owed (RESULTS.md, "Not yet measured: the GPU path"), as one run of about
# ten minutes on one GPU. With the device tool, from the repository root:
#     bash scripts/gpu_checks.sh          (timeout_s 600; the files come back from $OUT)
# Elsewhere the files go to ./gpu_checks. Each step has its own time limit, so a slow step
# costs its own result only:
#   1. bench.py on CUDA with --compile: eager vs compiled vs HF generation at batch 1 and 64,
#      bf16-autocast training throughput and MFU, at the tiny, small and 135M shapes
#   2. PPO's first-minibatch ratio under bf16 (first_ratio_dev must be ~0): an SFT model from
#      the micro preset, then 3 PPO steps against the oracle
#   3. the gpu preset, one iteration, as far as it gets (its log has each stage's time)
set -u
OUT=${OUT:-gpu_checks}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
work=$(mktemp -d)

{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
    > "$OUT/device.txt" 2>&1

timeout 240 $PY bench.py --device cuda --compile --configs tiny,small,135m --out "$OUT/bench.md" \
    > "$OUT/bench.log" 2>&1

timeout 90 $PY self_reward.py --preset micro --device cuda --iterations 0 --run_dir "$work/micro" \
    > "$OUT/ppo_bf16.log" 2>&1
timeout 60 $PY ppo.py --init "$work/micro/SFT/model" --reward oracle --value_init zero --max_steps 3 \
    --eval_every 0 --n_eval 16 --n_norm 32 --device cuda --out_dir "$work/ppo" >> "$OUT/ppo_bf16.log" 2>&1
grep -o '"first_ratio_dev": [^,]*' "$work/ppo/metrics.jsonl" >> "$OUT/ppo_bf16.log" 2>&1

timeout 180 $PY self_reward.py --preset gpu --iterations 1 --run_dir "$work/gpu" > "$OUT/gpu_preset.log" 2>&1
cp "$work/gpu/times.json" "$OUT/gpu_preset_times.json" 2>/dev/null
echo "done; files in $OUT"
