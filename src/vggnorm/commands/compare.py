"""``compare``: is checkpoint B a positive per-filter rescaling of checkpoint A, and by what scales?

Layer by layer in forward order, each conv's effective weights (its BatchNorm folded in, so a ``_bn``
model compares with its Gatys or AdaIN export) are matched: ``W_B[i, k] = W_A[i, k] * s_prev[k] / s[i]``
and ``b_B[i] = b_A[i] / s[i]``. Each ``s[i]`` is recovered from the weights alone (least squares over
the filter's weights, after undoing the previous layer's recovered scales), and the residual says
whether B is such a rescaling at all. With the statistics, the recovered scales are compared with the
measured means (the scales ``apply`` would use), and each layer's median and range are taken over its
live filters as ``apply``'s report takes them (``report.layer_summary``, dead by ``normalize.DeadRule``).
A and B are weights, given as everywhere (a file, a torchvision weights name, ``random:SEED``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vggnorm.core.fold import DeadRule, LayerScales
from vggnorm.core.state import StateDict
from vggnorm.errors import InputError, UsageError
from vggnorm.io.layouts import conv_without_bn
from vggnorm.io.models import bn_eps, canonical_arch, checked_topology, conv_names, is_features_only, topology
from vggnorm.io.report import layer_summary
from vggnorm.io.statsfile import read_stats
from vggnorm.io.weights import is_file_spec, resolve_weights

DEFAULT_TOL = 1e-4  # relative residual of a filter's weights: float32 rounding of a fold is ~1e-7


@dataclass
class LayerComparison:
    conv: str
    name: str  # Gatys' name, conv1_1
    filters: int
    median: float  # of the recovered scales of the live filters (all, without --stats), as apply's report
    low: float
    high: float
    residual: float  # worst relative residual of a filter's weights and bias after rescaling
    vs_means: float | None = None  # with --stats: worst relative difference of s and the mean, live filters
    dead: int | None = None  # with --stats: the filters apply left unscaled (not in median, low, high)


@dataclass
class Comparison:
    a: str
    b: str
    arch: str
    rescaling: bool
    layers: list[LayerComparison] = field(default_factory=list)
    broken: str = ""  # the first layer and filter that is not a rescaling
    scales: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "arch": self.arch,
            "rescaling": self.rescaling,
            "broken": self.broken,
            "layers": [vars(layer) for layer in self.layers],
        }


def _resolve(specs: tuple[str, str], arch: str | None) -> list[tuple[StateDict, str]]:
    """Each of the weights' state_dict (torchvision's layout) and arch: files first, their arch inferred (``arch``
    preferred); a torchvision weights name or ``random:SEED`` takes ``arch``, else the file's."""
    out: dict[int, tuple[StateDict, str]] = {}
    for i in sorted(range(2), key=lambda i: not is_file_spec(specs[i])):
        spec = specs[i]
        if is_file_spec(spec):
            w = resolve_weights(spec, arch=None, prefer=arch, background_hash=True)
        else:
            known = arch or next((a for _, a in out.values()), None)
            if known is None:
                raise UsageError(
                    f"{spec} needs an architecture: give the other checkpoint as a file, --stats, or --model"
                )
            w = resolve_weights(spec, arch=known, background_hash=True)
        out[i] = (w.state_dict, w.arch)
    return [out[0], out[1]]


def compare_checkpoints(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    stats_path: str | os.PathLike[str] | None = None,
    tol: float = DEFAULT_TOL,
    rule: DeadRule = DeadRule(),
    arch: str | None = None,
) -> Comparison:
    """Recover the per-filter scales that turn A into B, layer by layer; say where B stops being one.
    A and B are weights; ``arch`` (else the statistics' arch) is the arch of those that are no file."""
    stats = read_stats(Path(stats_path)) if stats_path is not None else None
    if arch is None and stats is not None:
        arch = canonical_arch(stats.provenance.arch)
    (sd_a, arch_a), (sd_b, arch_b) = _resolve((str(a), str(b)), arch)
    if arch_a.removesuffix("_bn") != arch_b.removesuffix("_bn"):
        raise InputError(f"{a} is a {arch_a} and {b} a {arch_b}: compare needs two checkpoints of one architecture")
    _check_chain(arch_a)
    _check_chain(arch_b)
    sites_a, sites_b = topology(arch_a).sites, topology(arch_b).sites
    names = conv_names(arch_a)
    result = Comparison(str(a), str(b), arch_a, True)
    prev: torch.Tensor | None = None
    for sa, sb in zip(sites_a, sites_b, strict=True):
        wa, ba = conv_without_bn(sd_a, sa.conv, bn_eps(arch_a))
        wb, bb = conv_without_bn(sd_b, sb.conv, bn_eps(arch_b))
        a64 = wa.double() * (prev.view(1, -1, 1, 1) if prev is not None else 1.0)  # (C_out, C_in, k, k)
        b64 = wb.double()
        flat_a, flat_b = a64.flatten(1), b64.flatten(1)
        # b = a / s  ->  1/s = <a, b> / <a, a> (least squares over the filter's weights)
        inv = (flat_a * flat_b).sum(1) / (flat_a * flat_a).sum(1).clamp_min(1e-300)
        s = 1 / inv
        residual = (flat_b - flat_a * inv.view(-1, 1)).abs().amax(1) / flat_b.abs().amax(1).clamp_min(1e-300)
        if ba is not None and bb is not None:
            bias_scale = torch.maximum((ba.double() * inv).abs(), flat_b.abs().amax(1))
            residual = torch.maximum(residual, (bb.double() - ba.double() * inv).abs() / bias_scale.clamp_min(1e-300))
        label = f"{sa.conv} ({names.get(sa.conv, sa.conv)})"
        bad = torch.nonzero(~(residual <= tol) | ~(s > 0)).flatten()
        if len(bad) and result.rescaling:
            i = int(bad[0])
            result.rescaling = False
            why = "a negative or zero factor" if not float(s[i]) > 0 else f"residual {float(residual[i]):.3g} > {tol:g}"
            result.broken = f"{label} filter {i}: B's weights are not a positive multiple of A's ({why})"
        dead: list[int] = []
        threshold = 0.0
        mean = None
        if stats is not None and sa.conv in stats.layers:
            mean = stats.layers[sa.conv].mean.double()
            dead, threshold = torch.nonzero(~rule.live(mean)).flatten().tolist(), rule.threshold(mean)
        # the median and range over the live filters, as apply's report (dead ones keep a scale of 1)
        (summary,) = layer_summary({sa.conv: LayerScales(sa.conv, s, dead, threshold)})
        layer = LayerComparison(
            sa.conv,
            names.get(sa.conv, ""),
            s.numel(),
            summary["median"],
            summary["min"],
            summary["max"],
            float(residual.max()),
            dead=len(dead) if mean is not None else None,
        )
        if mean is not None:
            live = rule.live(mean)
            if live.any():
                layer.vs_means = float(((s - mean).abs() / mean)[live].max())
        result.layers.append(layer)
        result.scales[sa.conv] = s
        if not result.rescaling:
            break
        prev = s
    if result.rescaling and not (is_features_only(sd_a) or is_features_only(sd_b)):
        _check_head(sd_a, sd_b, arch_a, prev, tol, result)
    return result


def _check_chain(arch: str) -> None:
    """compare recovers scales layer after layer: each conv site must read the previous one's channels
    alone, ungrouped, with no norm or a BatchNorm (VGG, AlexNet)."""
    topo = checked_topology(arch)
    readers = {c.module: c for c in topo.compensations}
    for prev, site in zip(topo.sites, topo.sites[1:], strict=False):
        comp = readers.get(site.conv)
        if comp is None or comp.pieces != ((prev.conv, prev.out_channels),) or comp.groups != 1:
            raise InputError(f"compare handles chains of convs (VGG, AlexNet); in {arch}, {site.conv} is not one")
    for site in topo.sites:
        if site.bn is not None and site.norm != "BatchNorm2d":
            raise InputError(f"compare handles convs with BatchNorm or none; {arch} has a {site.norm} at {site.bn}")


def _check_head(
    sd_a: StateDict, sd_b: StateDict, arch: str, s_last: torch.Tensor | None, tol: float, result: Comparison
) -> None:
    """The first Linear must be compensated for the last conv's scales (channel-major)."""
    topo = topology(arch)
    if topo.classifier is None or s_last is None:
        return
    key = f"{topo.classifier}.weight"
    expected = sd_a[key].double() * s_last.repeat_interleave(topo.positions_per_channel).view(1, -1)
    err = float((sd_b[key].double() - expected).abs().max() / expected.abs().max().clamp_min(1e-300))
    if not err <= tol:
        result.rescaling = False
        result.broken = f"{topo.classifier}: not compensated for the last conv's scales (residual {err:.3g})"
