"""Measuring a model over image files: the model as vggnorm measures it, and the data loader's loop."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vggnorm.analysis.topology import Site
from vggnorm.core.device import memory_format
from vggnorm.core.measure import Batch, ReluSums, measure
from vggnorm.core.stats import Stats
from vggnorm.errors import DataError
from vggnorm.io import data as data_mod
from vggnorm.io.labels import Labels
from vggnorm.io.models import ForwardPolicy, is_user_model, load_model
from vggnorm.options import Precision


def measuring_model(
    arch: str,
    state_dict: Mapping[str, torch.Tensor],
    forward: ForwardPolicy,
    device: torch.device,
    *,
    precision: Precision = Precision.FP32,
    add_affine: bool = False,
) -> nn.Module:
    """``arch`` carrying ``state_dict`` as vggnorm measures it: under the ``forward`` policy's pooling and padding,
    in the device's memory format (a user model stays contiguous: its code may ``view`` activations),
    and in float64 for ``precision="fp64"`` (``add_affine``: see ``io.models.load_model``)."""
    model = load_model(
        arch,
        state_dict,
        device=device,
        memory_format=torch.contiguous_format if is_user_model(arch) else memory_format(device),
        forward=forward,
        add_affine=add_affine,
    )
    return model.double() if precision == Precision.FP64 else model


def measure_files(
    model: nn.Module,
    files: list[Path],
    measurement: data_mod.Measurement,
    sites: Sequence[Site],
    *,
    device: torch.device,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = False,
    labels: Labels | None = None,
) -> tuple[Stats, list[tuple[str, str]]]:
    """Per-filter means of ``model`` over ``files`` at ``sites``; returns the skipped files too.

    Images are decoded by ``measurement.decoder`` (``--decode gpu`` needs a CUDA ``device``); its forward
    policy is ``model``'s own. With ``labels`` (one class per file) the per-class sums are kept too."""
    data_mod.check_decode(measurement.decoder, device)
    sums = ReluSums(
        sites, device, file_labels=labels.of_file if labels else None, num_classes=len(labels.classes) if labels else 0
    )
    loader = data_mod.make_loader(
        files,
        measurement.transform,
        measurement.convention,
        decoder=measurement.decoder,
        batch_size=batch_size,
        workers=data_mod.default_workers() if workers is None else workers,
        device=device,
    )
    skipped: list[tuple[str, str]] = []
    num_images = 0
    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=not progress, desc="measuring") as bar:

        def on_batch(batch: Batch) -> None:
            nonlocal num_images
            num_images += len(batch.indices)
            skipped.extend((str(files[i]), reason) for i, reason in batch.failures)
            bar.update(batch.num_files)

        measure(model, loader, sums, device=device, on_batch=on_batch)
    if num_images == 0:
        raise DataError("none of the images could be decoded")
    return Stats(sums.layers(), num_images, skipped=skipped, classes=labels.classes if labels else []), skipped
