#!/bin/bash
# The GPU checks (RESULTS.md, "The GPU path"), sized for a 15-minute device lease on one GPU.
# With the device tool, from the repository root, calls back to back (the machine stays warm
# for 30 s between them):
#     bash scripts/gpu_checks.sh bench     (timeout_s 460: step 1 at the 135M shape)
#     bash scripts/gpu_checks.sh small     (timeout_s 250: step 1 at the tiny and small shapes)
#     bash scripts/gpu_checks.sh preset    (what is left of the lease: step 2)
#     bash scripts/gpu_checks.sh mfu       (timeout_s 420: 135M training MFU at batch 32 and 64 x 1024)
# or `bash scripts/gpu_checks.sh` for all. The files go to $OUT (the device tool's folder) or
# else to ./gpu_checks. Each step has its own time limit, so a slow step costs its own result:
#   1. bench.py on CUDA with --compile: bf16-autocast training throughput and MFU, then eager vs
#      compiled (CUDA graphs) vs HF generation at batch 1 and 64
#   2. the gpu preset, one iteration, as far as it gets (its log has each stage's time), with
#      the GPU's memory in use sampled every half second by nvidia-smi
# PPO's first-minibatch ratio under bf16 was checked in the first lease (RESULTS.md): exactly 1.
set -u
part=${1:-all}
OUT=${OUT:-gpu_checks}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
work=$(mktemp -d)

if [ "$part" = all ] || [ "$part" = bench ]; then
    { nvidia-smi; $PY -c "import torch, transformers; print('torch', torch.__version__, torch.cuda.get_device_name(), 'transformers', transformers.__version__)"; } \
        > "$OUT/device.txt" 2>&1
    # training and MFU alone first: at the 135M shape compiling the generation steps took the
    # whole 240 s of the first lease, and the MFU row never ran
    timeout 200 $PY bench.py --device cuda --compile --configs 135m --gen_batches "" --out "$OUT/bench_135m_train.md" \
        > "$OUT/bench_135m_train.log" 2>&1
    timeout 240 $PY bench.py --device cuda --compile --configs 135m --gen_batches 1,64 --no-train \
        --out "$OUT/bench_135m_gen.md" > "$OUT/bench_135m_gen.log" 2>&1
fi

if [ "$part" = all ] || [ "$part" = small ]; then
    timeout 240 $PY bench.py --device cuda --compile --configs tiny,small --out "$OUT/bench_small.md" \
        > "$OUT/bench_small.log" 2>&1
fi

if [ "$part" = mfu ]; then
    # the second lease measured 32.2% MFU at 16 x 1024 (target 40%): larger batches next
    for b in 32 64; do
        timeout 200 $PY bench.py --device cuda --compile --configs 135m --gen_batches "" --batch_size $b \
            --out "$OUT/bench_135m_train_b$b.md" > "$OUT/bench_135m_train_b$b.log" 2>&1
    done
fi

if [ "$part" = all ] || [ "$part" = preset ]; then
    nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -lms 500 > "$OUT/gpu_memory.csv" 2>&1 &
    smi=$!
    timeout "${PRESET_LIMIT:-560}" $PY self_reward.py --preset gpu --iterations 1 --run_dir "$work/gpu" \
        > "$OUT/gpu_preset.log" 2>&1
    echo "exit status $?" >> "$OUT/gpu_preset.log"
    kill $smi
    cp "$work/gpu/times.json" "$OUT/gpu_preset_times.json" 2>/dev/null
fi
echo "done; files in $OUT"
