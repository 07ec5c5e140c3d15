"""How much does --decode gpu change the statistics? Pixels and means of both decoders, side by side.

Usage: python scripts/decode_diff.py DIR [--arch vgg11] [--weights random:0] [--device auto]

--decode cpu is PIL (decode and resize in DataLoader workers). The other side is vggnorm's
--decode gpu path (bytes -> batched JPEG decoding -> tensor resize) on --device: on CUDA that is
nvJPEG itself; on the CPU, torchvision's CPU JPEG decoder stands in for nvJPEG, which isolates the
difference the tensor resize makes. Prints the largest pixel difference (in levels of 255) and, per
layer, the max and median relative difference of the filter means (filters above 1e-3 of the
layer's largest mean).
"""

from __future__ import annotations

import argparse
import sys

import torch

from vggnorm.analysis.topology import find_topology
from vggnorm.core.device import memory_format, resolve_device
from vggnorm.core.measure import ReluSums, measure
from vggnorm.errors import VggnormError
from vggnorm.io import data as data_mod
from vggnorm.io.models import load_model
from vggnorm.io.weights import resolve_weights
from vggnorm.options import Decoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--arch", default="vgg11")
    ap.add_argument("--weights", default="random:0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    device = resolve_device(a.device)
    weights = resolve_weights(a.weights, arch=a.arch)
    model = load_model(weights.arch, weights.state_dict, device=device, memory_format=memory_format(device))
    files = data_mod.find_images(a.dir)[: a.limit]
    cpu = data_mod.default_transform(weights.arch)
    images, means = {}, {}
    for decoder in Decoder:
        name = decoder.value
        batches = list(
            data_mod.make_loader(files, cpu, decoder=decoder, batch_size=a.batch_size, workers=0, device=device)
        )
        images[name] = torch.cat([b.images.to(device) for b in batches if b.images is not None])
        sums = ReluSums(find_topology(model).sites, device)
        measure(model, batches, sums, device=device)
        means[name] = {n: s.sum / s.count for n, s in sums.layers().items()}
    scale = 255 * torch.tensor(cpu.std, device=device).view(1, 3, 1, 1)  # normalized units -> levels of 255
    levels = (images["cpu"] - images["gpu"]).abs() * scale
    stand_in = "nvJPEG" if device.type == "cuda" else "torchvision's CPU JPEG decoder standing in for nvJPEG"
    print(f"{len(images['cpu'])} images, {weights.arch} ({a.weights}), --decode gpu path on {device} ({stand_in})")
    print(f"pixels: max difference {levels.max():.2f} levels of 255, mean {levels.mean():.4f}")
    for layer, ref in means["cpu"].items():
        live = ref > 1e-3 * ref.max()
        rel = ((means["gpu"][layer] - ref).abs() / ref)[live]
        print(f"{layer:14s} means: max relative difference {rel.max():.2e}, median {rel.median():.2e}")


if __name__ == "__main__":
    try:
        main()
    except VggnormError as e:  # a bad folder, device or weights: say so, no traceback
        sys.exit(f"decode_diff.py: {e}")
