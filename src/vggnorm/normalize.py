"""The fold: a state_dict and per-filter scales -> a state_dict whose ReLU outputs are divided by them.

Pure functions: tensors in, tensors out, no I/O, inputs never mutated. Arithmetic is done in
float64 and cast back to each tensor's dtype (as ``torch.nn.utils.fusion`` does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vggnorm.checkpoint import StateDict
from vggnorm.defaults import DEFAULT_EPS, DEFAULT_REL_EPS, WEIGHTINGS
from vggnorm.errors import StatsMismatchError
from vggnorm.layers import Topology
from vggnorm.stats import Stats, check_values


@dataclass(frozen=True)
class DeadRule:
    """Which filters are dead: left unscaled (scale 1), listed, and excluded from the means check.

    A filter is dead when its mean is at most ``max(eps, rel_eps * median)``, the median taken over
    its layer's positive means: relative to its layer, because what float32 can normalize is a
    filter's activation relative to its layer's scale (a filter at 1e-6 of its layer's median,
    amplified a million times, re-measures 1e-3 or more away from 1). ``eps`` stays as an absolute
    floor. The one predicate of the package: apply, verify, the report and the figure use it.
    """

    rel_eps: float = DEFAULT_REL_EPS
    eps: float = DEFAULT_EPS

    def threshold(self, mean: torch.Tensor) -> float:
        positive = mean.double()[mean.double() > 0]
        median = float(positive.median()) if positive.numel() else 0.0
        return max(self.eps, self.rel_eps * median)

    def live(self, mean: torch.Tensor) -> torch.Tensor:
        """``(C,)`` bool: live where ``mean > threshold`` (a NaN mean is never live)."""
        return mean.double() > self.threshold(mean)

    def describe(self) -> str:
        return f"mean <= max({self.eps:g}, {self.rel_eps:g} x the layer's median positive mean)"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rule": self.describe()}


def scales_from_means(mean: torch.Tensor, rule: DeadRule = DeadRule()) -> torch.Tensor:
    """``s[i] = mean[i]`` for a live filter, else 1 (a dead filter keeps its weights)."""
    mean = mean.double()
    return torch.where(rule.live(mean), mean, torch.ones_like(mean))


def fold_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    scales: Mapping[str, torch.Tensor],
    topology: Topology,
    *,
    features_only: bool = False,
) -> StateDict:
    """Rescale weights so that the network's ReLU output at every site becomes ``F_l / s_l``.

    Invariants of the result (SPEC section 3): at every site ``l``, ``F'_l == F_l / s_l``; the
    logits are unchanged (the first Linear is compensated channel-major, ``s_L`` repeated ``P``
    times). ``scales`` maps each site's conv path to a positive ``(C_l,)`` tensor. With
    ``features_only`` the classifier (and avgpool) entries are dropped. Scales given for the
    classifier's fc sites (``topology.fc_sites``, keyed by the Linear's path) normalize their ReLUs
    too, the following Linear compensating; the logits stay unchanged.
    """
    out: StateDict = dict(state_dict)
    prev: torch.Tensor | None = None  # s_{l-1}; s_0 = 1 for the input image
    for site in topology.sites:
        s = scales[site.conv].double()  # (C_out,)
        w_key, b_key = f"{site.conv}.weight", f"{site.conv}.bias"
        w = state_dict[w_key]
        w64 = w.double()  # (C_out, C_in, kh, kw)
        if prev is not None:
            w64 = w64 * prev.view(1, -1, 1, 1)
        if site.bn is None:
            out[w_key] = (w64 / s.view(-1, 1, 1, 1)).to(w.dtype)
            if b_key in state_dict:
                out[b_key] = (state_dict[b_key].double() / s).to(state_dict[b_key].dtype)
        else:
            # BN's affine output is divided by s; conv bias and running stats stay as they are.
            out[w_key] = w64.to(w.dtype)
            for key in (f"{site.bn}.weight", f"{site.bn}.bias"):
                out[key] = (state_dict[key].double() / s).to(state_dict[key].dtype)
        prev = s
    if features_only:
        return {k: v for k, v in out.items() if k.startswith("features.")}
    if topology.classifier is not None and prev is not None:
        key = f"{topology.classifier}.weight"
        fc = state_dict[key]  # (out, C_L * P), input index j = c * P + p
        repeat = prev.repeat_interleave(topology.positions_per_channel).view(1, -1)  # (1, C_L * P)
        out[key] = _scale_rows_chunked(fc, repeat)
    prev_fc: torch.Tensor | None = None
    last = None
    for site in topology.fc_sites:
        if site.conv not in scales:
            break
        s = scales[site.conv].double()  # (out_features,)
        w_key, b_key = f"{site.conv}.weight", f"{site.conv}.bias"
        w = out[w_key]  # the first fc is already compensated for s_L above
        w64 = w.double() if prev_fc is None else w.double() * prev_fc.view(1, -1)
        out[w_key] = (w64 / s.view(-1, 1)).to(w.dtype)
        out[b_key] = (state_dict[b_key].double() / s).to(state_dict[b_key].dtype)
        prev_fc, last = s, site.conv
    if prev_fc is not None and last is not None:
        head = f"{topology.next_linear(last)}.weight"
        out[head] = (state_dict[head].double() * prev_fc.view(1, -1)).to(state_dict[head].dtype)
    return out


def _scale_rows_chunked(w: torch.Tensor, factor: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``(w.double() * factor).to(w.dtype)``, a block of rows at a time: the same numbers, without
    a float64 copy of the whole matrix (VGG's first Linear is 100M+ weights)."""
    out = torch.empty_like(w)
    for i in range(0, w.shape[0], rows):
        out[i : i + rows] = (w[i : i + rows].double() * factor).to(w.dtype)
    return out


@dataclass(frozen=True)
class LayerScales:
    """The scales of one site and the filters left unscaled because they were dead."""

    conv: str
    scale: torch.Tensor  # (C,) float64
    dead: list[int]
    threshold: float = 0.0  # the dead rule's threshold for this layer (a mean at or below it is dead)


def scales_from_stats(
    stats: Stats,
    topology: Topology,
    *,
    rule: DeadRule = DeadRule(),
    include_classifier: bool = False,
    weighting: str = "image",
) -> dict[str, LayerScales]:
    """Per-site scales from ``stats``, after checking the layers and channel counts match ``topology``.

    With ``include_classifier`` the classifier's fc sites are included (the statistics must have them).
    ``weighting="class"`` takes the class-balanced means (the mean of the per-class means; the
    statistics must be measured with ``--per-class``) instead of the means over all images.
    """
    if weighting not in WEIGHTINGS:
        raise StatsMismatchError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    if weighting == "class" and not stats.classes:
        raise StatsMismatchError(
            "--weighting class needs per-class sums: measure with `vggnorm compute-stats ... --per-class`"
        )
    expected = [s.conv for s in topology.sites]
    fc = [s.conv for s in topology.fc_sites]
    measured = list(stats.layers)
    if include_classifier:
        if not fc or measured[len(expected) :] != fc:
            raise StatsMismatchError(
                "the statistics have no classifier layers; measure them with `vggnorm compute-stats ... --include-classifier`"
            )
        expected += fc
    if measured not in (expected, expected + fc):
        raise StatsMismatchError(
            f"the statistics are for layers {list(stats.layers)[:3]}... ({len(stats.layers)} layers) but the "
            f"checkpoint has {expected[:3]}... ({len(expected)} layers); they belong to another architecture"
        )
    check_values(stats.layers, "the statistics")
    out = {}
    for site in (*topology.sites, *(topology.fc_sites if include_classifier else ())):
        layer = stats.layers[site.conv]
        mean = layer.balanced_mean if weighting == "class" else layer.mean
        if mean.numel() != site.out_channels:
            raise StatsMismatchError(
                f"{site.conv}: the statistics have {mean.numel()} filters, the checkpoint {site.out_channels}"
            )
        dead = torch.nonzero(~rule.live(mean)).flatten().tolist()
        out[site.conv] = LayerScales(site.conv, scales_from_means(mean, rule), dead, rule.threshold(mean))
    return out
