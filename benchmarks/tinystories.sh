#!/usr/bin/env bash
# TinyStories at matched parameter counts: transformer (6 and 2 layers), swap (with and without
# the exchange) and cws, each trained for the same token budget, then evaluated (validation
# loss, perplexity, bits per byte; K against surprisal for the cws) and sampled greedily.
#
#   bash benchmarks/tinystories.sh OUT_DIR [STEPS]       # from the repository root, on a GPU
#
# Needs the prepared corpus in data/tinystories (see configs/*-tinystories.toml). Each model
# leaves OUT_DIR/NAME.{train,eval}.json and NAME.sample.txt as soon as it finishes.
set -uo pipefail
out=${1:?usage: tinystories.sh OUT_DIR [STEPS]}
steps=${2:-600}
mkdir -p "$out"
common="train.steps=$steps train.eval_every=$((steps / 3)) train.save_every=$((steps / 3)) train.eval_batches=20 train.progress=false"
for spec in transformer6:transformer: transformer2:transformer:model.n_layers=2 \
            swap:swap: swap_noswap:swap:model.use_swap=false cws:cws:; do
    IFS=: read -r name preset extra <<< "$spec"
    python -m parallax train --config "configs/$preset-tinystories.toml" --out "$out/$name" \
        $common $extra --json > "$out/$name.train.json" 2> "$out/$name.train.err"
    python -m parallax eval "$out/$name" --batches 20 --json --no-plots > "$out/$name.eval.json" 2> "$out/$name.eval.err"
    python -m parallax generate "$out/$name" --prompt "Once upon a time" --max-new-tokens 60 \
        --temperature 0 > "$out/$name.sample.txt" 2>&1
done
