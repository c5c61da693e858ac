#!/usr/bin/env bash
# One prepared command for a lent GPU (issue 12): train a candidate mnist5k teacher for a fixed wall time, export its
# EMA weights exactly from the newest checkpoint, and measure it the way the shipped teacher is measured (fd_lenet on
# seeds 0-1999 and 2000-3999, class agreement, precision/recall; 35-NFE Heun), all under one output folder.
#
#   bash benchmarks/gpu_teacher.sh --wheels /path/to/wheels --outdir $OUT/teacher            # on the GPU machine
#   bash benchmarks/gpu_teacher.sh --config configs/teacher/mnist5k_v3.yaml --minutes 6 -- batch_size=256
#   bash benchmarks/gpu_teacher.sh --cpu --quick --outdir /tmp/t                              # tiny, end to end on CPU
#
# Options: --config FILE (default configs/teacher/mnist5k.yaml), --minutes M of training (default 6; the export and
# the measurement add about a minute on a GPU), --outdir DIR (default runs/gpu-teacher), --samples N per seed set
# (default 2000), --steps S Heun steps of the measurement (default 18 = 35 NFE), --wheels DIR (or $SID_WHEELS),
# --cpu, --quick (wiring only: tiny ticks and checkpoints, 0.5 minutes unless --minutes, 20 samples, 2 Heun steps);
# everything after -- goes to train.py as key=value overrides. Output: DIR/run (the training run,
# checkpoints included), DIR/denoiser (config.json + safetensors + metrics.jsonl + grid.png: what
# assets/teachers/<name> holds), DIR/teacher_eval.json. The training stops at the time limit (SIGTERM) and the
# export is `train.py resume=auto total_kimg=<newest checkpoint>`, bit-identical to a run of that length.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
config=configs/teacher/mnist5k.yaml
minutes=
outdir=runs/gpu-teacher
samples=
steps=
quick=0
wheels=${SID_WHEELS:-}
overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) device=cpu ;;
        --quick) quick=1 ;;
        --config) config=${2:?--config needs a file}; shift ;;
        --minutes) minutes=${2:?--minutes needs a number}; shift ;;
        --outdir) outdir=${2:?--outdir needs a folder}; shift ;;
        --samples) samples=${2:?--samples needs a number}; shift ;;
        --steps) steps=${2:?--steps needs a number}; shift ;;
        --wheels) wheels=${2:?--wheels needs a directory}; shift ;;
        --) shift; overrides=("$@"); break ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_teacher.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -f "$config" ] || { echo "gpu_teacher.sh: --config '$config' is not a file; expected a teacher config" >&2; exit 2; }
if [ "$quick" = 1 ]; then minutes=${minutes:-0.5} samples=${samples:-20} steps=${steps:-2}; fi
minutes=${minutes:-6} samples=${samples:-2000} steps=${steps:-18}
case "$minutes" in ''|*[!0-9.]*|.*|*.*.*)
    echo "gpu_teacher.sh: --minutes '$minutes' is not a positive number" >&2; exit 2 ;; esac
for pair in "--samples:$samples" "--steps:$steps"; do
    case "${pair#*:}" in ''|*[!0-9]*|0)
        echo "gpu_teacher.sh: ${pair%%:*} '${pair#*:}' is not a positive integer" >&2; exit 2 ;; esac
done

name=gpu_teacher.sh
need_extra="mlxtend:mlxtend matplotlib:matplotlib"
. benchmarks/gpu_env.sh

run="$outdir/run"
mkdir -p "$outdir"
common=("run_dir=$run" "cpu=$([ "$device" = cpu ] && echo true || echo false)")
if [ "$quick" = 1 ]; then
    # Wiring only: a few tiny ticks, a checkpoint at each, no grids.
    common+=(total_kimg=1000 batch_size=8 tick_kimg=0.016 checkpoint_kimg=0.016 snapshot_kimg=1000 metrics_kimg=0
             grid_seeds=4 train.sample_steps=2)
fi
limit=$(awk "BEGIN { printf \"%d\", $minutes * 60 }")
# bf16 on the GPU; fp32 on a CPU (bf16 autocast is several times slower on CPUs without AVX-512 BF16).
if [ "$device" = cuda ]; then common+=(mixed_precision=bf16); else common+=(mixed_precision=fp32); fi

start=$(date +%s)
echo "gpu_teacher.sh: training $config for ${limit} s -> $run"
set +e
timeout --signal=TERM --kill-after=30 "$limit" "$py" train.py --config "$config" "${common[@]}" "${overrides[@]}"
rc=$?
set -e
# 124: stopped by the time limit (expected); 0: the config's total_kimg came first.
if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ]; then
    echo "gpu_teacher.sh: training failed (exit $rc)" >&2
    exit "$rc"
fi
newest=$(ls "$run"/checkpoints/checkpoint-*.pt 2>/dev/null | sort | tail -n 1 || true)
[ -n "$newest" ] || { echo "gpu_teacher.sh: no checkpoint was written in ${limit} s; raise --minutes" >&2; exit 5; }
nimg=$(basename "$newest" .pt); nimg=$((10#${nimg#checkpoint-}))
kimg=$(awk "BEGIN { printf \"%.3f\", $nimg / 1000 }")
echo "gpu_teacher.sh: exporting the EMA at $kimg kimg ($newest)"
"$py" train.py --config "$config" "${common[@]}" "${overrides[@]}" resume="$newest" total_kimg="$kimg" > "$outdir/export.log" 2>&1 \
    || { echo "gpu_teacher.sh: export failed; see $outdir/export.log" >&2; exit 6; }
# Copied whole, then swapped in: an interrupted copy never leaves a half-written denoiser/ folder.
rm -rf "$outdir/.denoiser.tmp"
cp -r "$run/denoiser" "$outdir/.denoiser.tmp"
rm -rf "$outdir/denoiser"
mv "$outdir/.denoiser.tmp" "$outdir/denoiser"
train_s=$(( $(date +%s) - start ))

echo "gpu_teacher.sh: measuring (2 x $samples samples, $((2 * steps - 1)) NFE)"
"$py" sample.py --teacher "$outdir/denoiser" --steps "$steps" --seeds "0-$((samples - 1))" --outdir "$outdir/denoiser" \
    --metrics fd_lenet --batch 500 $([ "$device" = cpu ] && echo --cpu) > "$outdir/sample.log" 2>&1 \
    || { echo "gpu_teacher.sh: sampling failed; see $outdir/sample.log" >&2; exit 7; }
"$py" benchmarks/bench_recipe.py --teacher "$outdir/denoiser" --samples "$samples" --sets 2 --device "$device" \
    --teacher-steps "$steps" \
    --teacher-cache "$outdir/teacher_eval_cache.json" --out "$outdir/teacher_eval.json" \
    $([ "$device" = cpu ] && echo --threads 1) | tee "$outdir/teacher_eval.txt"
echo "gpu_teacher.sh: done in $(( $(date +%s) - start )) s (training + export $train_s s, $kimg kimg); ship with:"
echo "    cp -r $outdir/denoiser assets/teachers/<name>   # then write its README (command, wall time, hardware)"
