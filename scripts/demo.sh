#!/usr/bin/env bash
# The whole pipeline on real photos: compute-stats -> apply -> verify. Run by `make demo`.
# Weights are torchvision's seeded random init (random:0) saved to a file, since pretrained weights
# may not be downloadable here; with internet, use --weights IMAGENET1K_V1 instead.
set -euo pipefail
out=${1:-demo}
arch=${ARCH:-vgg19}
bin=.venv/bin
mkdir -p "$out"

"$bin/python" scripts/sample_photos.py "$out/photos"
"$bin/python" -c 'import sys, torch; from vggnorm.io.weights import random_state_dict; torch.save(random_state_dict(sys.argv[1], 0), sys.argv[2])' \
    "$arch" "$out/$arch-random0.pth"

set -x
"$bin/vggnorm" compute-stats "$out/photos" --arch "$arch" --weights "$out/$arch-random0.pth" -o "$out/stats.h5" --force
"$bin/vggnorm" apply "$out/$arch-random0.pth" --stats "$out/stats.h5" -o "$out/$arch-normalized.pth" --plot --force
"$bin/vggnorm" verify "$out/$arch-normalized.pth" --original "$out/$arch-random0.pth" --stats "$out/stats.h5" \
    --data "$out/photos" --report "$out/verify" --force
{ set +x; } 2>/dev/null
echo
echo "demo done: normalized checkpoint $out/$arch-normalized.pth"
echo "reports:   $out/$arch-normalized.report.md (apply), $out/verify.md (verify)"
