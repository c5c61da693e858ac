# Sourced by benchmarks/gpu.sh and benchmarks/gpu_teacher.sh: pick the interpreter, install what it lacks from a
# carried wheel directory (never from the internet), and check the CUDA device. Expects $name (the calling script's
# name, for messages), $device (cuda | cpu), $wheels (a directory or empty) and optionally $need_extra (more
# module:distribution pairs); sets $py.
py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# What the runs import (module:distribution), looked up in one interpreter start (no imports); install only what is
# missing, only from the wheel directory.
need="torch:torch numpy:numpy accelerate:accelerate diffusers:diffusers omegaconf:omegaconf safetensors:safetensors
      scipy:scipy PIL:pillow tqdm:tqdm ${need_extra:-}"
found=$("$py" -c "
import importlib.util, sys
print(' '.join(p.split(':')[1] for p in sys.argv[1:] if importlib.util.find_spec(p.split(':')[0]) is None))
" $need) || { echo "$name: cannot run $py" >&2; exit 3; }
read -r -a missing <<< "$found"
if [ ${#missing[@]} -gt 0 ]; then
    if [ -z "$wheels" ] || [ ! -d "$wheels" ]; then
        echo "$name: $py lacks ${missing[*]}; pass a directory of wheels with --wheels DIR or SID_WHEELS" >&2
        exit 3
    fi
    echo "$name: installing ${missing[*]} from $wheels (no index)"
    "$py" -m pip install --no-index --find-links "$wheels" "${missing[@]}"
fi

if [ "$device" = cuda ]; then
    if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "$name: torch sees no CUDA device (pass --cpu to run on the CPU)" >&2
        exit 4
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
