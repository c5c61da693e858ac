#!/usr/bin/env bash
# One prepared measurement run for a lent GPU (issue 16), well under 8 minutes: installs what the machine lacks from
# carried wheels (never from the internet), then runs benchmarks/bench_gpu.py, which writes one JSON file: SiD step
# images/s, peak memory and MFU (bf16, batch 64; cifar10 preset and an EDM DDPM++ teacher), S4 vs MHA vs SDPA-flash
# at L = 256, 1024, 4096, teacher training images/s, and last our SiD step (eager and compile: true) against the plain
# loop on the small preset at batch 32, fp32 and bf16 (issue 16's 1.3x target). The JSON is rewritten after every
# section, so a run cut by the time limit keeps the sections it finished.
#
#   bash benchmarks/gpu.sh --wheels /path/to/wheels            # on the GPU machine
#   SID_WHEELS=/path/to/wheels bash benchmarks/gpu.sh --out gpu.json
#   bash benchmarks/gpu.sh --cpu --quick                        # tiny sizes end to end on a CPU (about a minute)
#
# Options: --wheels DIR (or $SID_WHEELS): a directory of .whl files for pip --no-index; --out FILE (default
# benchmarks/results/gpu.json); --cpu; --quick; --peak-tflops T (dense bf16 peak when the GPU is not in
# bench_gpu.PEAK_BF16_TFLOPS); --threads N (torch CPU threads). $PYTHON picks the interpreter (default .venv/bin/python
# when present, else python3); $SID_GPU_LIMIT_S bounds the measurement (default 450 s).
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
out=benchmarks/results/gpu.json
wheels=${SID_WHEELS:-}
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) device=cpu ;;
        --quick) args+=(--quick) ;;
        --wheels) wheels=${2:?--wheels needs a directory}; shift ;;
        --out) out=${2:?--out needs a file}; shift ;;
        --peak-tflops) args+=(--peak-tflops "${2:?--peak-tflops needs a number}"); shift ;;
        --threads) args+=(--threads "${2:?--threads needs a number}"); shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

name=gpu.sh
. benchmarks/gpu_env.sh

start=$(date +%s)
timeout "${SID_GPU_LIMIT_S:-450}" "$py" benchmarks/bench_gpu.py --device "$device" "${args[@]}" --out "$out"
echo "gpu.sh: done in $(( $(date +%s) - start )) s; results in $out"
