#!/usr/bin/env bash
# Data parallel on two GPUs against one: training tokens/s, loss curves and peak memory per GPU
# for the transformer and the cws (TinyStories presets, ~6.5M parameters) and a ~210M-parameter
# transformer, under DDP and FSDP2.
#
#   bash benchmarks/multi_gpu.sh OUT_DIR        # from the repository root, on a host with 2 GPUs
#   python benchmarks/multi_gpu_summary.py OUT_DIR --json OUT_DIR/summary.json
#
# 1 GPU x batch 2b sees exactly the examples of 2 GPUs x b, so their loss curves should agree;
# tokens/s compares 2 GPUs x b with 1 GPU x b (the same work per GPU). Needs data/tinystories
# (see configs/*-tinystories.toml). Each run leaves OUT_DIR/MODEL/NAME/{run dir, train.json}.
set -uo pipefail
out=${1:?usage: multi_gpu.sh OUT_DIR}
one="python -m parallax train"
two="torchrun --standalone --nproc-per-node 2 -m parallax train"
run() {  # run MODEL NAME LAUNCHER... : one training run into OUT_DIR/MODEL/NAME
    local model=$1 name=$2; shift 2
    mkdir -p "$out/$model"
    "$@" --out "$out/$model/$name" --json > "$out/$model/$name.train.json" 2> "$out/$model/$name.train.err"
}
for model in transformer cws; do
    steps=400; [ "$model" = cws ] && steps=300
    c="--config configs/$model-tinystories.toml train.steps=$steps train.eval_every=$steps train.save_every=$steps train.eval_batches=8 train.progress=false train.log_every=10"
    CUDA_VISIBLE_DEVICES=0 run $model 1gpu_b32 $one $c
    CUDA_VISIBLE_DEVICES=0 run $model 1gpu_b64 $one $c train.batch_size=64
    run $model ddp_2x32 $two $c train.parallel=ddp
    run $model ddp_2x64 $two $c train.parallel=ddp train.batch_size=64
    run $model fsdp_2x32 $two $c train.parallel=fsdp
done
c="--config configs/transformer-tinystories.toml model.d_model=1024 model.n_layers=16 model.n_heads=16 model.n_kv_heads=16 train.steps=80 train.eval_every=80 train.save_every=80 train.eval_batches=2 train.batch_size=16 train.progress=false train.log_every=10"
CUDA_VISIBLE_DEVICES=0 run transformer_210m 1gpu_b16 $one $c
run transformer_210m ddp_2x16 $two $c train.parallel=ddp
run transformer_210m fsdp_2x16 $two $c train.parallel=fsdp
