"""The Python API: the functions a notebook calls, on models and batches rather than files.

Every CLI command is a thin front over these stages; here they take an ``nn.Module`` (a
torchvision VGG or any look-alike whose sites ``analysis.topology.find_topology`` finds) and return data::

    stats = vggnorm.measure_means(model, batches)        # one pass, float64 sums per filter
    normalized = vggnorm.normalize_model(model, stats)   # a folded copy; ``model`` is untouched
    report = vggnorm.verify_models(model, normalized, stats, batches=batches)
    assert report.passed

A batch is a tensor ``(N, 3, H, W)``, an ``(images, labels)`` pair (what a torchvision
``DataLoader`` yields) or a ``vggnorm.core.measure.Batch``. An option with named values (``precision``,
``stream_scale``, ``convention``, ``decoder``) takes a member of its enum in ``vggnorm.options`` or its
string (``"fp64"``); any other value is a ``UsageError`` naming the choices.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggnorm.analysis.topology import Site, Topology, find_topology, with_affine
from vggnorm.commands.measuring import measure_files
from vggnorm.core.checks import (
    DESCRIPTIONS,
    Check,
    Criteria,
    Images,
    Normalized,
    Original,
    Probe,
    Scales,
    not_run,
    probe_input,
    prove,
)
from vggnorm.core.fold import DeadRule, LayerScales, fold_state_dict, scales_from_stats
from vggnorm.core.measure import ReluSums, images_of, measure
from vggnorm.core.stats import Stats
from vggnorm.defaults import DEFAULT_BATCH_SIZE, DEFAULT_MEANS_TOL, DEFAULT_RTOL
from vggnorm.io import data as data_mod
from vggnorm.io.report import Report, layer_summary, measured_summary
from vggnorm.options import Decoder, InputConvention, Precision, StreamScale, parse


def analyze(model: nn.Module, *, add_affine: bool = False) -> Topology:
    """The structural analysis of ``model`` (what ``vggnorm inspect`` prints): its sites, what each
    scale flows through to the layer that compensates it, and the refusals (empty: normalizable)."""
    return find_topology(model, add_affine=add_affine)


def _topology(model: nn.Module, add_affine: bool = False) -> Topology:
    topo = find_topology(model, add_affine=add_affine)
    topo.check()
    return topo


def _sites(model: nn.Module, include_classifier: bool, add_affine: bool = False) -> list[Site]:
    topo = _topology(model, add_affine)
    return [*topo.sites, *(topo.fc_sites if include_classifier else ())]


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def measure_means(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    include_classifier: bool = False,
    precision: Precision | str = Precision.FP32,
    add_affine: bool = False,
) -> Stats:
    """Per-filter sums and counts of every site's ReLU output over ``batches``, in one pass.

    ``Stats.means()`` gives ``mu_l[i] = sum over images and positions of F_l[n, i, h, w] / (N H W)``.
    Runs where ``model`` is and in its dtype (``model.double()`` measures in float64). The model
    is not modified; put it in eval mode first (BatchNorm, dropout). A model that cannot be
    normalized is refused (``CheckpointError`` with the reasons ``analyze`` gives); ``add_affine``
    accepts norms without affine parameters (see ``normalize_model``).
    """
    arithmetic = parse(Precision, precision, "precision")
    device = _device_of(model)
    topo = _topology(model, add_affine)
    sites = [*topo.sites, *(topo.fc_sites if include_classifier else ())]
    sums = ReluSums(sites, device, total=topo.activation_calls)
    num_images = 0

    def count(batch: Any) -> None:
        nonlocal num_images
        images = images_of(batch)
        num_images += 0 if images is None else images.shape[0]

    measure(model, batches, sums, device=device, on_batch=count, precision=arithmetic)
    return Stats(sums.layers(), num_images)


def measure_folder(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    transform: data_mod.ImageTransform | None = None,
    convention: InputConvention | str = InputConvention.TORCHVISION,
    decoder: Decoder | str = Decoder.CPU,
    include_classifier: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = 0,
    limit: int | None = None,
    progress: bool = False,
) -> Stats:
    """``measure_means`` over the images under ``folder`` (recursively, sorted), decoded by ``decoder`` and
    made the network's input by ``transform`` (default: ImageNet's resize 256, crop 224, mean/std) under the
    input ``convention`` (torchvision: RGB, 0-1, mean/std; caffe, matconvnet: 0-255 minus a mean pixel).

    Files that cannot be decoded are skipped and listed in ``Stats.skipped``.
    """
    measurement = data_mod.Measurement(
        transform or data_mod.ImageTransform(),
        parse(InputConvention, convention, "convention"),
        decoder=parse(Decoder, decoder, "decoder"),
    )
    files = data_mod.find_images(Path(folder))[:limit]
    stats, _ = measure_files(
        model,
        files,
        measurement,
        _sites(model, include_classifier),
        device=_device_of(model),
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    stats.provenance = replace(stats.provenance, preprocess=measurement.as_attrs())
    return stats


def scales(
    model: nn.Module,
    stats: Stats,
    *,
    rule: DeadRule = DeadRule(),
    include_classifier: bool = False,
    stream_scale: StreamScale | str = StreamScale.GEOMETRIC,
) -> dict[str, LayerScales]:
    """The per-filter scales of every site of ``model`` (1 for dead filters), checked against ``stats``.

    A residual stream's sites share one scale per channel, chosen by ``stream_scale`` (``geometric``: the
    geometric mean of their means; ``last``: the last site's); their ``LayerScales.expected`` are the
    means they have once normalized. Every other live filter's mean becomes 1.
    """
    return scales_from_stats(
        stats,
        _topology(model, add_affine=True),
        rule=rule,
        include_classifier=include_classifier,
        stream_scale=parse(StreamScale, stream_scale, "stream_scale"),
    )


def normalize_model(
    model: nn.Module,
    stats: Stats,
    *,
    rule: DeadRule = DeadRule(),
    include_classifier: bool = False,
    add_affine: bool = False,
    stream_scale: StreamScale | str = StreamScale.GEOMETRIC,
) -> nn.Module:
    """A copy of ``model`` whose every live filter's mean activation on the measured data is 1 (on a
    residual stream: its share of the stream's scale, chosen by ``stream_scale``; see ``scales``).

    Invariants: at every site ``F'_l == F_l / s_l`` and the output is unchanged
    (unless the output is the last activation itself). ``model`` itself is not modified.
    ``add_affine``: a site's norm without affine parameters (InstanceNorm2d's default) gets weight 1
    and bias 0 in the copy (the same function), which then carry the scales.
    """
    topo = _topology(model, add_affine)
    shared = parse(StreamScale, stream_scale, "stream_scale")
    layer_scales = scales_from_stats(stats, topo, rule=rule, include_classifier=include_classifier, stream_scale=shared)
    original = model.state_dict()
    folded = fold_state_dict(original, {n: s.scale for n, s in layer_scales.items()}, topo)
    # the copy's tensors: the folded ones, and clones of those the fold left alone; the structure is
    # copied sharing the original's tensors (no memory), and they are all replaced below
    fresh: Any = OrderedDict((k, v.clone() if v is original.get(k) else v) for k, v in folded.items())
    fresh._metadata = getattr(original, "_metadata", None)  # module versions (MNASNet's loader needs them)
    tensors = [*model.parameters(), *model.buffers()]
    out = with_affine(copy.deepcopy(model, memo={id(t): t for t in tensors}), topo)
    out.load_state_dict(fresh, assign=True)
    return out


def verify_models(
    original: nn.Module,
    normalized: nn.Module,
    stats: Stats,
    *,
    batches: Iterable[Any] | None = None,
    probe: torch.Tensor | None = None,
    rule: DeadRule = DeadRule(),
    include_classifier: bool = False,
    rtol: float = DEFAULT_RTOL,
    means_tol: float = DEFAULT_MEANS_TOL,
    stream_scale: StreamScale | str = StreamScale.GEOMETRIC,
) -> Report:
    """The four checks of `verify` on a pair of models: (a) activations, (b) outputs and
    (d) fold on ``probe`` (default: two seeded random 64x64 images), (c) the means re-measured on
    ``batches`` (not run without them)."""
    topo = _topology(original, add_affine=True)
    layer_scales = scales_from_stats(
        stats,
        topo,
        rule=rule,
        include_classifier=include_classifier,
        stream_scale=parse(StreamScale, stream_scale, "stream_scale"),
    )
    device = _device_of(normalized)
    # an add_affine copy's norms have the parameters the original lacks
    subject = Normalized(normalized, _topology(normalized), normalized.state_dict(), include_classifier)
    images: Images | Check
    if batches is None:
        images = not_run("means", DESCRIPTIONS["means"], "needs batches")
    else:
        dtype = next(normalized.parameters()).dtype
        tensors = (images_of(b) for b in batches)
        images = Images((x.to(device, dtype=dtype), None) for x in tensors if x is not None)
    proof = prove(
        subject,
        Original(original, topo, original.state_dict()),
        Scales(layer_scales, topo),
        probe=Probe(probe if probe is not None else probe_input(64), "probe batch"),
        images=images,
        criteria=Criteria(rtol, means_tol, rule),
    )
    return Report(
        type(normalized).__name__,
        type(normalized).__name__,
        proof.checks,
        {"device": str(device)},
        layer_summary(layer_scales),
        measured=measured_summary(proof.means, proof.dead, rule=rule) if proof.means is not None else [],
    )


__all__ = ["DeadRule", "analyze", "measure_folder", "measure_means", "normalize_model", "scales", "verify_models"]
