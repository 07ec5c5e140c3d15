"""``centers``: a layer's per-class mean features, from statistics measured with ``--per-class``.

Row ``k`` is class ``k``'s mean ReLU activation per filter, over its images and the layer's
positions: exactly what a momentum-updated center-loss estimate converges to on a fixed feature
extractor, computed in one pass. Saved with the class names, ready for a center-loss layer or a
nearest-class-mean classifier.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import torch

from vggnorm.defaults import NAMED_ARCHS
from vggnorm.errors import OutputError, StatsFileError, StatsMismatchError, UsageError
from vggnorm.io.checkpoint import atomic_write
from vggnorm.io.models import conv_names
from vggnorm.io.statsfile import read_stats

log = logging.getLogger(__name__)


def write_centers(stats_path: Path, layer: str, output: Path, *, force: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Write ``layer``'s ``[classes, C]`` mean features and the class names to ``output`` (.pt or .safetensors)."""
    if output.suffix not in (".pt", ".pth", ".safetensors"):
        raise OutputError(f"{output}: write the centers to a .pt or a .safetensors file")
    stats = read_stats(stats_path)
    if not stats.classes:
        raise StatsMismatchError(
            f"{stats_path} has no per-class sums; measure with `vggnorm compute-stats ... --per-class`"
        )
    arch = stats.provenance.arch
    names = conv_names(arch) if arch in NAMED_ARCHS else {}
    # a site by its producing layer's path or its activation's (features.34, features.35), or by Gatys'
    # name of either (conv5_4, relu5_4: verify prints the measured layers so)
    by_name = {
        **{n: p for p, n in names.items()},
        **{n.replace("conv", "relu", 1): p for p, n in names.items()},
        **{site.relu: p for p, site in stats.layers.items()},
    }
    path = layer if layer in stats.layers else by_name.get(layer, layer)
    if path not in stats.layers:
        known = ", ".join(f"{p} ({names[p]})" if p in names else p for p in stats.layers)
        raise UsageError(
            f"--layer {layer}: {stats_path} has no such site; its sites are {known} (or their activations' paths, "
            "or relu names)"
        )
    site = stats.layers[path]
    assert site.class_count is not None
    present = site.class_count > 0
    classes = [c for c, p in zip(stats.classes, present.tolist(), strict=True) if p]
    if not classes:
        raise StatsFileError(f"{stats_path}: no class has an image (every file was skipped); measure again")
    empty = [c for c, p in zip(stats.classes, present.tolist(), strict=True) if not p]
    if empty:  # a class whose images were all skipped has no mean: left out rather than a NaN row
        log.warning(
            "centers: left out %d class(es) with no image (all their files were skipped): %s",
            len(empty),
            ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""),
        )
    centers = site.class_means[present].float()  # (K, C)
    with atomic_write(output, force=force, inputs=[stats_path]) as tmp:
        if output.suffix == ".safetensors":
            from safetensors.torch import save

            meta = {"classes": json.dumps(classes), "layer": path, "stats": str(stats_path)}
            tmp.write_bytes(save({"centers": centers.contiguous()}, metadata=meta))
        else:
            buffer = io.BytesIO()  # bytes written by Python: a full disk is an OSError (torch.save's is not)
            torch.save({"centers": centers, "classes": classes, "layer": path}, buffer)
            tmp.write_bytes(buffer.getbuffer())
    return centers, classes
