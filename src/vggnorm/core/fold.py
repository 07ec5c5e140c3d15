"""The fold: a state_dict and per-filter scales -> a state_dict whose ReLU outputs are divided by them.

Pure functions: tensors in, tensors out, no I/O, inputs never mutated (``fold_in_place`` aside, which
says so). Arithmetic is done in float64 and cast back to each tensor's dtype (as ``torch.nn.utils.fusion``
does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vggnorm.analysis.topology import Compensation, Stream, Topology
from vggnorm.core.state import StateDict
from vggnorm.core.stats import Stats, check_values
from vggnorm.defaults import DEFAULT_EPS, DEFAULT_REL_EPS
from vggnorm.errors import StatsMismatchError
from vggnorm.options import StreamScale, Weighting


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

    def live_given(self, mean: torch.Tensor, dead: list[int] | None) -> torch.Tensor:
        """``(C,)`` bool: live unless listed in ``dead`` (the statistics' decision); without a list,
        the rule decides on ``mean`` itself (an audit)."""
        if dead is None:
            return self.live(mean)
        mask = torch.ones_like(mean, dtype=torch.bool)
        mask[dead] = False
        return mask

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
    """Rescale weights so that the activation at every site becomes ``F_l / s_l``.

    ``scales`` maps site keys to positive ``(C_l,)`` tensors; a site without an entry keeps scale 1 (the
    classifier's fc sites unless asked for). Each tensor is computed once from the original, in float64,
    and cast back:

    * an origin (``Topology.origins``): a Conv2d/Linear's weight rows and bias are divided by the scales
      its output channels carry, or a norm's weight and bias (BatchNorm, GroupNorm, InstanceNorm,
      LayerNorm2d); running statistics stay as they are;
    * an eval BatchNorm that reads scaled channels (``Topology.absorbs``): its running mean is divided by
      their scales and its weight multiplied, so it computes what it did;
    * a compensation (a Conv2d or Linear reading scaled channels): input column ``k`` is multiplied by the
      scale its channel carries -- per group for a grouped conv, ``P`` columns per channel for a Linear
      after a channel-major flatten (``s_L.repeat_interleave(P)``), in the order of ``Compensation.runs``.

    The output (logits) is then unchanged. With ``features_only`` only the entries of the conv sites' modules
    (``Topology.backbone``: a VGG's ``features.*``) are kept.
    """
    return _fold(state_dict, scales, topology, features_only=features_only, lost=None)


def fold_in_place(
    state_dict: StateDict,
    scales: Mapping[str, torch.Tensor],
    topology: Topology,
    *,
    features_only: bool = False,
) -> tuple[StateDict, dict[str, int]]:
    """``fold_state_dict``, the same numbers, with each weight matrix rescaled into its own tensor instead
    of a new one, so that the checkpoint is not held twice (apply: VGG16's 500 MB). ``state_dict``'s weights
    are overwritten: its caller must be done with them as the original (apply runs the original's side of
    its self-check first). A weight whose storage another entry shares is rescaled into a new tensor.

    Also returns, per weight rescaled in place, how many of its values were normal numbers and became 0 or
    subnormal: what ``io.checkpoint.check_representable`` finds by comparing with the original, which is gone.
    """
    lost: dict[str, int] = {}
    return _fold(state_dict, scales, topology, features_only=features_only, lost=lost), lost


def _fold(
    state_dict: Mapping[str, torch.Tensor],
    scales: Mapping[str, torch.Tensor],
    topology: Topology,
    *,
    features_only: bool,
    lost: dict[str, int] | None,
) -> StateDict:
    """``fold_state_dict``; with ``lost``, weights rescaled in place (``fold_in_place``), their losses counted."""
    plan = _plan(state_dict, scales, topology, features_only=features_only)
    storages: dict[int, int] = {}  # in place: how many entries each storage holds
    for tensor in state_dict.values() if lost is not None else ():
        if tensor.numel():
            ptr = tensor.untyped_storage().data_ptr()
            storages[ptr] = storages.get(ptr, 0) + 1
    out: StateDict = {}
    for key, entry in plan.items():
        if isinstance(entry, _Rescale):
            w = entry.w
            alone = w.numel() > 0 and storages.get(w.untyped_storage().data_ptr()) == 1
            if lost is not None and alone:  # in place: count the values that underflow as they are overwritten
                lost[key] = 0
                out[key] = _rescale_chunked(w, entry.col, entry.row, into=w, lost=lost, key=key)
            else:
                out[key] = _rescale_chunked(w, entry.col, entry.row)
        else:
            out[key] = entry()
    return out


@dataclass(frozen=True)
class _Rescale:
    """A weight whose rows are divided by ``row`` and columns multiplied by ``col`` (``_rescale_chunked``)."""

    w: torch.Tensor
    col: torch.Tensor | None
    row: torch.Tensor | None


def _plan(
    state_dict: Mapping[str, torch.Tensor],
    scales: Mapping[str, torch.Tensor],
    topology: Topology,
    *,
    features_only: bool,
) -> dict[str, _Rescale | Callable[[], torch.Tensor]]:
    """How the fold computes each of its output's tensors, in the output's order (``fold_state_dict``'s rules):
    a weight to rescale, or a function giving the tensor (a bias or norm parameter divided, or the input's)."""
    plan: dict[str, _Rescale | Callable[[], torch.Tensor]] = {
        k: functools.partial(_same, v) for k, v in state_dict.items()
    }
    rows = {o.module: v for o in topology.origins if o.kind == "rows" and (v := run_scales(o.runs, scales)) is not None}
    affine = {
        o.module: v for o in topology.origins if o.kind == "affine" and (v := run_scales(o.runs, scales)) is not None
    }
    absorbed = {a.module: v for a in topology.absorbs if (v := run_scales(a.runs, scales)) is not None}
    columns = {c.module: c for c in topology.compensations}
    backbone = topology.backbone
    for module in dict.fromkeys([*rows, *columns]):
        w_key, b_key = f"{module}.weight", f"{module}.bias"
        if w_key not in state_dict:  # a features-only state_dict has no classifier
            continue
        if features_only and module not in backbone:  # not in the output
            continue
        w = state_dict[w_key]
        col = _input_scale(columns[module], scales, w.shape) if module in columns else None
        row = rows.get(module)
        if col is None and row is None:
            continue
        plan[w_key] = _Rescale(w, col, row)
        if row is not None and b_key in state_dict:
            plan[b_key] = functools.partial(_divided, state_dict[b_key].double(), row, state_dict[b_key].dtype)
    # an --add-affine norm's new parameters: in the dtype of the model's weights
    like = next((v for v in state_dict.values() if v.is_floating_point()), None)
    dtype = like.dtype if like is not None else torch.float32
    for module in dict.fromkeys([*affine, *absorbed]):
        s_out, s_in = affine.get(module), absorbed.get(module)
        ref = s_out if s_out is not None else s_in
        assert ref is not None
        # the norm's affine output is divided by s_out, its input's scale s_in absorbed (weight * s_in, running
        # mean / s_in); an --add-affine norm starts from weight 1, bias 0
        for key, start, absorbs in ((f"{module}.weight", 1.0, True), (f"{module}.bias", 0.0, False)):
            t = state_dict.get(key)
            base = t.double() if t is not None else torch.full_like(ref, start)
            if absorbs and s_in is not None:
                base = base * s_in
            divisor = s_out if s_out is not None else torch.ones_like(ref)
            plan[key] = functools.partial(_divided, base, divisor, t.dtype if t is not None else dtype)
        mean_key = f"{module}.running_mean"
        if s_in is not None and mean_key in state_dict:
            mean = state_dict[mean_key]
            plan[mean_key] = functools.partial(_divided, mean.double(), s_in, mean.dtype)
    if features_only:
        return {k: v for k, v in plan.items() if k.rpartition(".")[0] in backbone}
    return plan


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _divided(base: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (base / s).to(dtype)


class LazyFold(Mapping[str, torch.Tensor]):
    """``fold_state_dict``'s result, the same keys in the same order and the same numbers, each tensor computed
    when it is read (and not kept); ``rows`` gives a rescaled weight a block of rows at a time. A comparison
    with it (``core.checks.check_fold``) holds neither a second checkpoint nor a copy of its largest tensor."""

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor],
        scales: Mapping[str, torch.Tensor],
        topology: Topology,
        *,
        features_only: bool = False,
        block_rows: int = 32,
    ) -> None:
        self._plan = _plan(state_dict, scales, topology, features_only=features_only)
        self._rows = block_rows

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._plan[key]
        return _rescale_chunked(entry.w, entry.col, entry.row) if isinstance(entry, _Rescale) else entry()

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)

    def rows(self, key: str) -> tuple[torch.Tensor, Iterator[tuple[int, torch.Tensor]]] | None:
        """For a rescaled weight, its original (for its shape and dtype) and its folded rows as ``(first row,
        block)`` pairs, each block computed as ``_rescale_chunked`` computes it; None for another tensor."""
        entry = self._plan[key]
        if not isinstance(entry, _Rescale):
            return None
        blocks = _blocks(entry.w, entry.col, entry.row, self._rows)
        return entry.w, ((i, block.to(entry.w.dtype)) for i, block in blocks)


def run_scales(
    runs: tuple[tuple[str | None, int, int], ...], scales: Mapping[str, torch.Tensor]
) -> torch.Tensor | None:
    """The scales of channels listed as runs ``(site key, first channel, count)``, float64; None when no
    run's site has scales (all 1)."""
    if not any(k is not None and k in scales for k, _, _ in runs):
        return None
    return torch.cat(
        [
            scales[k].double().flatten()[s : s + n]
            if k is not None and k in scales
            else torch.ones(n, dtype=torch.float64)
            for k, s, n in runs
        ]
    )


def _input_scale(comp: Compensation, scales: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor | None:
    """The factor of ``comp``'s weight columns, broadcastable to ``shape``; None when all are 1."""
    s = run_scales(comp.runs, scales)
    if s is None:
        return None
    s = s.repeat_interleave(comp.positions) if comp.positions > 1 else s
    if len(shape) == 2:  # Linear (out, in)
        return s.view(1, -1)
    c_out, c_in_group = shape[0], shape[1]
    if comp.groups == 1:
        return s.view(1, -1, 1, 1)
    # a grouped conv: output filter o reads input channels of its group g = o // (c_out / groups)
    per_group = s.view(comp.groups, c_in_group)
    return per_group.repeat_interleave(c_out // comp.groups, dim=0).view(c_out, c_in_group, 1, 1)


def _rescale_chunked(
    w: torch.Tensor,
    col: torch.Tensor | None,
    row: torch.Tensor | None,
    rows: int = 32,
    *,
    into: torch.Tensor | None = None,
    lost: dict[str, int] | None = None,
    key: str = "",
) -> torch.Tensor:
    """``(w.double() * col / row[:, None...]).to(w.dtype)``, a block of rows at a time in one reused
    float64 buffer: the same numbers (the same operations in the same order), without a float64 copy
    of the whole matrix (VGG's first Linear is 100M+ weights) and 4x faster than fresh blocks.

    ``into``: the tensor written (``w`` itself: each block is read before it is overwritten); with ``lost``,
    ``lost[key]`` counts the values that were normal numbers in ``w`` and are 0 or subnormal in the result."""
    out = torch.empty_like(w) if into is None else into
    cast = (
        torch.empty((min(rows, w.shape[0]), *w.shape[1:]), dtype=w.dtype, device=w.device) if lost is not None else None
    )
    tiny = torch.finfo(w.dtype).tiny if w.is_floating_point() else 0.0
    for i, block in _blocks(w, col, row, rows):
        n = block.shape[0]
        if cast is None or lost is None:
            out[i : i + n].copy_(block)
            continue
        new = cast[:n]
        new.copy_(block)
        small = new.abs() < tiny  # 0 or subnormal now: lost if it was a normal number (rare: look only then)
        if bool(small.any()):
            lost[key] += int((w[i : i + n][small].abs() >= tiny).sum())
        out[i : i + n].copy_(new)
    return out


def _blocks(
    w: torch.Tensor, col: torch.Tensor | None, row: torch.Tensor | None, rows: int = 32
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(i, w[i : i + rows].double() * col / row)`` for each block of rows, in one reused float64 buffer
    (a block is overwritten by the next: use it before asking for the next)."""
    tail = [1] * (w.ndim - 1)
    buf = torch.empty((min(rows, w.shape[0]), *w.shape[1:]), dtype=torch.float64, device=w.device)
    for i in range(0, w.shape[0], rows):
        block = buf[: min(rows, w.shape[0] - i)]
        block.copy_(w[i : i + rows])
        if col is not None:
            block.mul_(col[i : i + rows] if col.shape[0] > 1 else col)
        if row is not None:
            block.div_(row[i : i + rows].view(-1, *tail))
        yield i, block


@dataclass(frozen=True)
class LayerScales:
    """The scales of one site and the filters left unscaled because they were dead."""

    conv: str
    scale: torch.Tensor  # (C,) float64
    dead: list[int]
    threshold: float = 0.0  # the dead rule's threshold for this layer (a mean at or below it is dead)
    # a stream's site: each filter's mean once normalized (its mean over the stream's shared scale);
    # None: 1 for every live filter
    expected: torch.Tensor | None = None


def scales_from_stats(
    stats: Stats,
    topology: Topology,
    *,
    rule: DeadRule = DeadRule(),
    include_classifier: bool = False,
    weighting: Weighting = Weighting.IMAGE,
    stream_scale: StreamScale = StreamScale.GEOMETRIC,
) -> dict[str, LayerScales]:
    """Per-site scales from ``stats``, after checking the layers and channel counts match ``topology``.

    With ``include_classifier`` the classifier's fc sites are included (the statistics must have them).
    ``weighting="class"`` takes the class-balanced means (the mean of the per-class means; the
    statistics must be measured with ``--per-class``) instead of the means over all images.
    """
    if weighting == Weighting.CLASS and not stats.classes:
        raise StatsMismatchError(
            "--weighting class needs per-class sums: measure with `vggnorm compute-stats ... --per-class`"
        )
    expected = [s.conv for s in topology.sites]
    fc = [s.conv for s in topology.fc_sites]
    measured = list(stats.layers)
    if include_classifier and fc:  # (a model without Linear sites has no classifier sites to include)
        if measured[len(expected) :] != fc:
            raise StatsMismatchError(
                "the statistics have no classifier layers; measure them with `vggnorm compute-stats ... --include-classifier`"
            )
        expected += fc
    if measured not in (expected, expected + fc):
        missing = [k for k in expected if k not in stats.layers]
        if set(measured) < set(expected + fc):  # a subset: the sites of an older analysis, say
            why = (
                f"they lack {len(missing)} of its sites ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
                "): measured by an older vggnorm, or for another model? measure them again with `vggnorm compute-stats`"
            )
        else:
            why = "they belong to another architecture"
        raise StatsMismatchError(
            f"the statistics are for layers {list(stats.layers)[:3]}... ({len(stats.layers)} layers) but the "
            f"checkpoint has {expected[:3]}... ({len(expected)} layers); {why}"
        )
    check_values(stats.layers, "the statistics")
    out = {}
    for site in (*topology.sites, *(topology.fc_sites if include_classifier else ())):
        layer = stats.layers[site.conv]
        mean = layer.balanced_mean if weighting == Weighting.CLASS else layer.mean
        if mean.numel() != site.out_channels:
            raise StatsMismatchError(
                f"{site.conv}: the statistics have {mean.numel()} filters, the checkpoint {site.out_channels}"
            )
        dead = torch.nonzero(~rule.live(mean)).flatten().tolist()
        out[site.conv] = LayerScales(site.conv, scales_from_means(mean, rule), dead, rule.threshold(mean))
    means = {
        k: (stats.layers[k].balanced_mean if weighting == Weighting.CLASS else stats.layers[k].mean).double()
        for k in out
    }
    for stream in topology.streams:
        _stream_scales(stream, out, means, rule, stream_scale)
    return out


def _stream_scales(
    stream: Stream, out: dict[str, LayerScales], means: Mapping[str, torch.Tensor], rule: DeadRule, policy: StreamScale
) -> None:
    """One scale per class of a stream's channels, by ``policy``, for every member site (in ``out``):
    ``geometric``, the geometric mean of the members' live means (the smallest log-deviation from 1), or
    ``last``, the last member's (forward order) where live; 1 where no member is live."""
    members: dict[int, list[tuple[str, int]]] = {}
    for key, classes in zip(stream.sites, stream.classes, strict=True):
        if key in out:
            for c, number in enumerate(classes):
                members.setdefault(number, []).append((key, c))
    live = {k: rule.live(means[k]) for k in {key for m in members.values() for key, _ in m}}
    scale = {k: torch.ones_like(means[k]) for k in live}
    for m in members.values():
        values = [means[k][c] for k, c in m if bool(live[k][c])]
        if not values:
            continue
        value = values[-1] if policy == StreamScale.LAST else torch.stack(values).log().mean().exp()
        for k, c in m:
            scale[k][c] = value
    for k in scale:
        out[k] = LayerScales(k, scale[k], out[k].dead, out[k].threshold, means[k] / scale[k])


FLOAT32_ROUNDOFF = 2.0**-24  # float32's unit roundoff u
# the activations' own rounding and their pairwise sum over positions (up to 2**31 terms): 32 u at most
SUM_ROUNDINGS = 32.0


def float32_bounds(
    state_dict: Mapping[str, torch.Tensor],
    topology: Topology,
    means: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Per site, a bound on how far float32 arithmetic can move each filter's mean from 1 once normalized.

    Filter ``i`` of a Conv2d/Linear reading channels ``j`` sums ``W_ij x_j`` in float32, each term rounded
    to about ``u |W_ij x_j|``; its normalized activation is divided by ``mu_i``, so its re-measured mean
    moves by at most about ``u sum_j |W_ij| mu_j / mu_i`` (``mu_j``: input channel ``j``'s mean, the same
    before and after the fold, since the weights carry its scale). A BatchNorm multiplies it by
    ``|gamma_i| / sqrt(var_i + eps)``; a max pooling between may raise an input's mean by at most its window
    (``Compensation.max_factor``); the activations' own rounding and their sum add ``SUM_ROUNDINGS u``. On random-weight VGG11 (8 photos) the bound was 2.6x to 165x the
    deviation float32 produced. Sites whose inputs' means are not all measured (the image), or whose norm
    uses each image's own statistics, are left out: no bound is claimed there.
    """
    columns = {c.module: c for c in topology.compensations}
    out: dict[str, torch.Tensor] = {}
    for site in topology.all_sites:
        comp = columns.get(site.conv)
        w = state_dict.get(f"{site.conv}.weight")
        if (
            site.conv not in means
            or comp is None
            or w is None
            or any(p is None or p not in means for p, _, _ in comp.runs)
        ):
            continue
        if site.bn is not None and f"{site.bn}.running_var" not in state_dict:
            continue  # GroupNorm, InstanceNorm: normalized by each image's own statistics
        mu_in = torch.cat([means[str(p)].double().clamp_min(0)[a : a + n] for p, a, n in comp.runs]) * comp.max_factor
        if comp.positions > 1:
            mu_in = mu_in.repeat_interleave(comp.positions)
        # |W| in the weight's own precision (at least float32): a bound needs no float64 sum, and VGG's fc6 in
        # float64 is an 800 MB copy and most of the bound's time
        a = (w if w.dtype == torch.float64 else w.float()).abs()
        if a.ndim == 2:  # Linear (out, in)
            total = (a @ mu_in.to(a.dtype)).double()
        else:  # (out, in per group, kh, kw): filter o reads the channels of its group
            per_group = mu_in.view(comp.groups, -1).repeat_interleave(a.shape[0] // comp.groups, dim=0)
            total = (a.sum(dim=(2, 3)).double() * per_group).sum(dim=1)
        if site.bn is not None:
            gamma = state_dict.get(f"{site.bn}.weight")
            eps = 1e-5  # torch's default; the state_dict does not hold it
            factor = (gamma.double().abs() if gamma is not None else 1.0) / (
                state_dict[f"{site.bn}.running_var"].double() + eps
            ).sqrt()
            total = total * factor
        out[site.conv] = FLOAT32_ROUNDOFF * (total / means[site.conv].double() + SUM_ROUNDINGS)
    return out
