#!/usr/bin/env bash
# The studies of docs/results.md, exactly as run (each resumable: run the same line again
# after an interruption and it continues where it stopped).
#
#   benchmarks/study.sh context    # nGPT/GeoNorm iso-loss speedup over GPT vs context length
#   benchmarks/study.sh depth      # GPT pre-/post-norm, nGPT, GeoNorm at 2..16 layers
#   benchmarks/study.sh geonorm    # GeoNorm's new vs v0.1 defaults (4 layers, context 128)
#   benchmarks/study.sh optims     # the six optimizer recipes on nGPT (issue 25)
#   benchmarks/study.sh collect study_context   # copy the small outputs to benchmarks/results/
#   benchmarks/study.sh rederive study_context  # its tables with the current statistics (no training)
#
# Environment: PY (python, default python3), RUNS (output root, default runs), NICE (default 5).
# Sizes were chosen for a shared, heavily loaded 2-core CPU machine (about 40 minutes each,
# one thread each, both at once).
set -euo pipefail
PY=${PY:-python3}
RUNS=${RUNS:-runs}
NICE=${NICE:-5}

run() {  # run OUT ARGS...: start, or resume when OUT holds an interrupted compare
    local out=$1
    shift
    local resume=()
    [[ -f "$out/compare.json" ]] && resume=(--resume)
    echo "+ $PY -m spheretorch compare $* --out $out ${resume[*]}"
    /usr/bin/time -v nice -n "$NICE" "$PY" -m spheretorch compare "$@" --out "$out" \
        "${resume[@]}"
}

# A tiny model (2 layers, d 64, 2 heads), 1024 tokens per step at every context length
# (batch 16/8/4/2 for context 64/128/256/512), 200 steps at full budget and runs of 50 and
# 100 steps with their own schedules; LR swept per context length and model over 3 values
# (67-step runs, seed 0); 3 seeds.
context() {
    run "$RUNS/study_context" --preset cpu-small --threads 1 --no-progress \
        --models gpt,ngpt,geonorm \
        --set n_layer=2 --set d_model=64 --set n_head=2 \
        --batch-size 8 --steps 200 --eval-interval 25 --eval-batches 8 \
        --sweep-lrs 4e-3,1e-2,2.5e-2 --sweep-fraction 0.334 \
        --grid seq_len=64,128,256,512 --budgets 0.25,0.5,1 --seeds 3
}

# d 64, 2 heads, context 64, 512 tokens per step (batch 8), 120 steps; LR swept per depth and
# model over 3 values (30-step runs, seed 0); 3 seeds. The deepest point runs first (it costs
# the most and says the most); tables and plots sort the points.
depth() {
    run "$RUNS/study_depth" --preset cpu-small --threads 1 --no-progress \
        --models gpt,post=gpt:norm_position=post,ngpt,geonorm \
        --set d_model=64 --set n_head=2 --set seq_len=64 \
        --batch-size 8 --steps 120 --eval-interval 20 --eval-batches 8 \
        --sweep-lrs 4e-3,1e-2,2.5e-2 --sweep-fraction 0.25 \
        --grid n_layer=16,8,4,2 --seeds 3
}

# GeoNorm's new defaults (issue 12: the third-party reading) against v0.1's, with GPT and nGPT:
# cpu-small's depth and context (4 layers, context 128) at the studies' width (d 64, 2 heads)
# and tokens per step (1024), 200 steps; LR swept per model over 3 values (67-step runs);
# 2 seeds (started with 3, cut to 2 for time: the runs of seeds 0 and 1 were kept). (cpu-small itself, 800 steps, did not fit the loaded machine's time.)
geonorm() {
    run "$RUNS/geonorm_variants" --preset cpu-small --threads 1 --no-progress \
        --models "gpt,ngpt,geonorm,geonorm-v0.1=geonorm:update_decay=inverse_sqrt:geo_angle=atan:geo_clamp=none:geo_bias=false:geo_radius=fixed:geo_step_scale=none" \
        --set d_model=64 --set n_head=2 \
        --batch-size 8 --steps 200 --eval-interval 25 --eval-batches 8 \
        --sweep-lrs 4e-3,1e-2,2.5e-2 --sweep-fraction 0.334 --seeds 2
}

# The optimizer recipes on one model (issue 25): nGPT trained by AdamW (its sphere matrices
# drift off), Muon (then renormalized), RenormAdam (nGPT's own recipe), RiemannianAdam, AdamH
# and SphereMuon. cpu-small's depth (4 layers) at the studies' width (d 64, 2 heads), context 64,
# 512 tokens per step, 400 steps and runs of 200 steps with their own schedules; each recipe's
# LR swept over 3 values (100-step runs, seed 0), extended at an edge; 5 seeds. Target: AdamW's
# final loss. `--lr` is the trainer's: Muon's LR (the angle on spheres) is 5 times it.
optims() {
    run "$RUNS/study_optims" --preset cpu-small --threads 1 --no-progress \
        --models ngpt --optims adamw,muon,renorm,riemannian,adamh,sphere_muon \
        --set n_layer=4 --set d_model=64 --set n_head=2 --set seq_len=64 \
        --batch-size 8 --steps 400 --eval-interval 50 --eval-batches 8 \
        --sweep-lrs 3e-3,1e-2,3e-2 --sweep-fraction 0.25 --budgets 0.5,1 --seeds 5
}

# Copy a finished (or partial) study's small outputs into benchmarks/results/NAME/.
collect() {
    local name=$1 dst=benchmarks/results/$1
    mkdir -p "$dst"
    cp "$RUNS/$name"/{results.json,results.md,runs.csv,compare.json,run_info.json} "$dst"/
    cp "$RUNS/$name"/*.png "$dst"/
    [[ -f "$RUNS/$name.log" ]] && cp "$RUNS/$name.log" "$dst/log.txt"
    echo "collected $RUNS/$name -> $dst"
}

# Re-derive a committed study's tables with the current statistics (no run is repeated).
rederive() {
    "$PY" benchmarks/rederive_study.py "benchmarks/results/$1"
}

case "${1:-}" in
    context | depth | geonorm | optims) "$1" ;;
    collect) collect "$2" ;;
    rederive) rederive "$2" ;;
    *)
        echo "usage: $0 context|depth|geonorm|optims | collect|rederive study_context|study_depth|geonorm_variants|study_optims" >&2
        exit 2
        ;;
esac
