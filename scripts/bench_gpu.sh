#!/usr/bin/env bash
# GPU benchmark for compute-stats (VGG19 at 224): images/s per --precision, CPU workers vs GPU
# (nvJPEG) decoding, and 1 GPU vs all GPUs (torchrun), plus the relative error of each run's means
# against the reference run (--precision fp64, --decode cpu).
# Usage: bash scripts/bench_gpu.sh [IMAGES=4000] [BATCH=128]   (after `make install`; on a machine with
# torch, torchvision, click, h5py, tqdm and scikit-image but no network: PYTHONPATH=src PYTHON=python3 bash ...)
# --decode gpu stays in vggnorm only if its lines here beat --decode cpu at the same precision.
set -euo pipefail
images=${1:-4000}
batch=${2:-128}
py=${PYTHON:-.venv/bin/python}  # or, where vggnorm is not installed: PYTHONPATH=src PYTHON=python3
work=$(mktemp -d /tmp/vggnorm-gpu-bench.XXXX)
ngpu=$("$py" -c 'import torch; print(torch.cuda.device_count())')
[ "$ngpu" -ge 1 ] || { echo "no CUDA device: this benchmark needs a GPU" >&2; exit 1; }
"$py" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "x", torch.cuda.device_count())'

n_photos=8
"$py" scripts/sample_photos.py "$work/data" --copies $(( (images + n_photos - 1) / n_photos )) --size 500x375 >/dev/null
"$py" -c 'import sys, torch; from vggnorm.io.weights import random_state_dict; torch.save(random_state_dict("vgg19", 0), sys.argv[1])' "$work/vgg19.pth"
common=(--arch vgg19 --weights "$work/vgg19.pth" --batch-size "$batch" --no-progress --force)

run() {  # name, then extra args; prints images/s from the wall time of the whole command
    local name=$1; shift
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    "$py" - "$name" "$t0" "$t1" "$work/$name.h5" "$work/fp64.h5" <<'PY'
import sys
from vggnorm.io.statsfile import read_stats
name, t0, t1, path, ref = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
s = read_stats(path)
line = f"{name:12s} {s.num_images / (t1 - t0):8.1f} images/s end to end ({s.num_images} images, {t1 - t0:.1f} s with start-up)"
if name != "fp64":
    r = read_stats(ref)
    err = max(float(((s.layers[n].mean - r.layers[n].mean).abs() / r.layers[n].mean.abs().clamp_min(1e-12))[r.layers[n].mean > 1e-3].max()) for n in r.layers)
    line += f"; max relative error of means vs fp64 --decode cpu: {err:.2e}"
print(line, flush=True)
PY
}

run fp64 "$py" -m vggnorm compute-stats "$work/data" "${common[@]}" -o "$work/fp64.h5" --precision fp64
for p in fp32 tf32 bf16 fp16; do
    run "$p" "$py" -m vggnorm compute-stats "$work/data" "${common[@]}" -o "$work/$p.h5" --precision "$p"
done
for p in fp32 bf16; do
    run "$p-gpudec" "$py" -m vggnorm compute-stats "$work/data" "${common[@]}" -o "$work/$p-gpudec.h5" \
        --precision "$p" --decode gpu
done
if [ "$ngpu" -gt 1 ]; then
    run "torchrun$ngpu" "$py" -m torch.distributed.run --nproc-per-node "$ngpu" -m vggnorm compute-stats \
        "$work/data" "${common[@]}" -o "$work/torchrun$ngpu.h5"
fi
"$py" scripts/decode_diff.py "$work/data" --arch vgg19 --weights "$work/vgg19.pth" --device cuda --limit 512
"$py" scripts/bench.py --arch vgg19 --images 256 --batch-size "$batch" --device cuda --repeats 2
