"""The invariants of a normalized checkpoint (what verify checks), each a small function, and ``prove``,
which runs them in order on models: ``verify`` and ``api.verify_models`` both call it.

Each check returns a ``Check`` with its measured figure and tolerance. A check whose inputs were
given but which could not run is a failure; a check whose inputs were not given is "not run".
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vggnorm.analysis.topology import Site, Topology, find_topology
from vggnorm.compat import own_tensors
from vggnorm.core.device import one_thread
from vggnorm.core.fold import DeadRule, LayerScales, LazyFold, float32_bounds, fold_state_dict
from vggnorm.core.state import StateDict
from vggnorm.core.witness import activation_means, activation_outputs
from vggnorm.defaults import DEFAULT_MEANS_TOL, DEFAULT_RTOL
from vggnorm.errors import DataError

PASS, FAIL, NOT_RUN = "pass", "fail", "not run"

# what each check proves: the description every report, JUnit file and API result gives it
DESCRIPTIONS = {
    "activations": "every conv's ReLU output equals the original's divided by its scales",
    "logits": "logits equal the original's",
    "fold": "the checkpoint equals fold(original, stats) recomputed",
    "means": "re-measured mean ReLU activation of every live filter is 1",
}


@dataclass
class Check:
    name: str
    description: str
    status: str
    figure: float | None = None  # the worst measured error
    tolerance: float | None = None
    detail: str = ""
    layers: dict[str, float] = field(default_factory=dict)  # the figure per layer (or tensor), same tolerance

    @property
    def ran(self) -> bool:
        return self.status != NOT_RUN


def _status(figure: float, tolerance: float) -> str:
    return PASS if figure <= tolerance else FAIL  # NaN compares False: a NaN figure fails


def probe_input(size: int, n: int = 2) -> torch.Tensor:
    """A fixed, seeded batch standing in for images in (a) and (b): their identities hold for every input."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def not_run(name: str, description: str, why: str) -> Check:
    return Check(name, description, NOT_RUN, detail=why)


def failed(name: str, why: str) -> Check:
    """Check ``name`` (one of ``DESCRIPTIONS``) as a failure with no figure: asked for, but it cannot pass."""
    return Check(name, DESCRIPTIONS[name], FAIL, detail=why)


@contextlib.contextmanager
def float64_forward(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in float64 without a float64 copy of it: each module's floating-point parameters
    and buffers are cast just before it runs and put back right after, so one layer at a time is
    held in float64 (a deep copy of VGG16 in float64 would take 1.1 GB on top of the model)."""
    saved: dict[nn.Module, dict[str, tuple[int, torch.Tensor]]] = {}

    def cast(module: nn.Module, args: Any) -> None:
        keep = {}
        for kind, store in enumerate(own_tensors(module)):
            for name, t in store.items():
                if t is not None and t.is_floating_point() and t.dtype != torch.float64:
                    keep[name] = (kind, t)
                    store[name] = t.detach().double()
        saved[module] = keep

    def restore(module: nn.Module, args: Any, output: Any) -> None:
        stores = own_tensors(module)
        for name, (kind, t) in saved.pop(module, {}).items():
            stores[kind][name] = t

    leaves = [m for m in model.modules() if not list(m.children()) and any(own_tensors(m))]
    # a Linear runs a block of rows at a time through one float64 buffer instead (VGG's fc6: 100M weights)
    linears = [m for m in leaves if type(m) is nn.Linear]
    others = [m for m in leaves if type(m) is not nn.Linear]
    handles = [h for m in others for h in (m.register_forward_pre_hook(cast), m.register_forward_hook(restore))]
    for m in linears:
        m.forward = functools.partial(_linear64, m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module in list(saved):  # an exception mid-forward: put back what was cast
            restore(module, None, None)
        for m in linears:
            del m.forward


def _linear64(module: nn.Linear, x: torch.Tensor, rows: int = 32) -> torch.Tensor:
    """``module(x)`` in float64, casting ``rows`` rows of the weight at a time into one buffer."""
    w = module.weight
    x = x.double()
    out = x.new_empty((*x.shape[:-1], w.shape[0]))
    buf = torch.empty((min(rows, w.shape[0]), w.shape[1]), dtype=torch.float64, device=w.device)
    for i in range(0, w.shape[0], rows):
        block = buf[: min(rows, w.shape[0] - i)]
        block.copy_(w[i : i + rows])
        out[..., i : i + rows] = x @ block.T
    if module.bias is not None:
        out += module.bias.double()
    return out


def _relu_outputs(
    model: nn.Module, sites: list[Site], x: torch.Tensor, total: int | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every site's activation output and the model output for a small batch ``x``, as the witness reads
    them: the model's whole forward, unmodified (``witness.activation_outputs``)."""
    return activation_outputs(model, {s.conv: s.call for s in sites}, x, total=total)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: an error relative to the tensor's scale."""
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((actual.double() - expected.double()).abs().max() / scale)


def _per_filter_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Worst over filters of ``max |actual - expected| / max |expected|`` within the filter.

    A filter whose activations are below 1% of the layer's largest is measured against that
    floor, so float32 rounding in a nearly silent filter is not mistaken for a wrong weight.
    """
    dims = [d for d in range(expected.ndim) if d != 1]
    diff = (actual.double() - expected.double()).abs().amax(dim=dims)  # (N, C, H, W) or (N, C) -> (C,)
    scale = expected.double().abs().amax(dim=dims)
    floor = (scale.max() * 1e-2).clamp_min(torch.finfo(torch.float32).tiny)
    return float((diff / torch.maximum(scale, floor)).max())


CHUNK = 1 << 22  # elements per float64 pass over a big tensor (32 MB), so a checkpoint is never doubled


def _elementwise_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / |expected| over elements (a changed weight cannot hide in a big tensor).

    Computed in the tensors' own precision (at least float32), a chunk at a time: for two float32
    numbers within the tolerance of each other the difference is exact, and the ratio's rounding
    (~6e-8) is far below any tolerance used here."""
    dtype = torch.promote_types(torch.promote_types(actual.dtype, expected.dtype), torch.float32)
    a, e = actual.reshape(-1), expected.reshape(-1)
    tiny = torch.finfo(torch.float32).tiny
    worst = 0.0
    for i in range(0, e.numel(), CHUNK):
        ac, ec = a[i : i + CHUNK].to(dtype), e[i : i + CHUNK].to(dtype)
        diff = torch.sub(ac, ec).abs_()
        err = float(diff.div_(ec.abs().clamp_min_(tiny)).max())
        if not err <= worst:  # NaN wins
            worst = err
    return worst


@dataclass(frozen=True)
class Reference:
    """The original's side of ``check_function``, taken on its own: its float64 activations at ``sites``
    and its output on ``x``. apply takes it before its fold overwrites the weights the original runs on."""

    x: torch.Tensor  # float64
    topology: Topology
    sites: list[Site]
    activations: dict[str, torch.Tensor]
    output: torch.Tensor


def reference_outputs(
    original: nn.Module,
    scales: Mapping[str, torch.Tensor] | None,
    x: torch.Tensor,
    *,
    topology: Topology | None = None,
    logits: bool = True,
) -> Reference:
    """The original's activations and output on ``x`` in float64, as ``check_function`` compares them
    (the fc sites too when ``scales`` has them); ``topology``: the original's, where the caller has it.
    ``logits=False``: features-only weights, run without the classifier and its activations, whose count
    of activation calls is then not checked."""
    x = x.double()
    ta = topology or find_topology(original, add_affine=True)
    fc = scales is not None and any(s.conv in scales for s in ta.fc_sites)
    sites = [*ta.sites, *(ta.fc_sites if fc else ())]
    with float64_forward(original):
        f, y = _relu_outputs(original, sites, x, ta.activation_calls if logits else None)
    return Reference(x, ta, sites, f, y)


def check_function(
    original: nn.Module | Reference,
    normalized: nn.Module,
    scales: Mapping[str, torch.Tensor] | None,
    x: torch.Tensor,
    *,
    rtol: float = DEFAULT_RTOL,
    logits: bool = True,
    inputs: str = "",
    topologies: tuple[Topology, Topology] | None = None,
) -> list[Check]:
    """(a) every site ``F'_l == F_l / s_l`` and (b) logits unchanged, on the batch ``x``.

    Sites are matched in forward order, so ``normalized`` may be laid out differently (a ``_bn``
    original against its BN-folded Gatys export); ``scales`` is keyed by the original's conv paths.
    Both networks run in float64 (``float64_forward``), so float32 rounding cannot hide or fake a difference:
    what remains is the rounding of the stored weights, far below ``rtol``. ``original`` may be its
    ``reference_outputs``, taken on the same ``x`` with the same ``scales``.
    """
    x = x.double()
    # the structures of the two models (the CLI passes its archs' cached ones: no analysis of real weights)
    if isinstance(original, Reference):
        if not torch.equal(original.x, x):
            raise ValueError("check_function: the reference outputs were taken on another input")
        ref = original
    else:
        ref = reference_outputs(original, scales, x, topology=topologies[0] if topologies else None, logits=logits)
    tb = topologies[1] if topologies else find_topology(normalized, add_affine=True)
    sites, f, y = ref.sites, ref.activations, ref.output
    fc = len(sites) > len(ref.topology.sites)
    if fc != (scales is not None and any(s.conv in scales for s in ref.topology.fc_sites)):
        raise ValueError("check_function: the reference outputs were taken with other scales")
    normalized_sites = [*tb.sites, *(tb.fc_sites if fc else ())]
    with float64_forward(normalized):
        g, y2 = _relu_outputs(normalized, normalized_sites, x, tb.activation_calls if logits else None)
    g = {a.conv: g[b.conv] for a, b in zip(sites, normalized_sites, strict=True)}
    checks = []
    desc_a = DESCRIPTIONS["activations"]
    if scales is None:
        checks.append(not_run("activations", desc_a, "needs --stats (the scales) and --original"))
    else:
        errs = {n: _per_filter_err(g[n], f[n] / scales[n].to(f[n]).view(1, -1, *[1] * (f[n].ndim - 2))) for n in f}
        worst = max(errs, key=lambda n: errs[n])
        checks.append(
            Check(
                "activations",
                desc_a,
                _status(errs[worst], rtol),
                errs[worst],
                rtol,
                f"worst layer {worst}; {inputs}",
                layers=errs,
            )
        )
    desc_b = DESCRIPTIONS["logits"]
    if not logits:
        checks.append(
            not_run("logits", desc_b, "the output is the last activation itself (features only): (a) checks it")
        )
    else:
        err = _rel_err(y2, y)
        checks.append(Check("logits", desc_b, _status(err, rtol), err, rtol, inputs))
    return checks


def check_means(
    means: Mapping[str, torch.Tensor],
    dead: Mapping[str, list[int]] | None,
    *,
    tol: float = DEFAULT_MEANS_TOL,
    rule: DeadRule = DeadRule(),
    detail: str = "",
    scales: Mapping[str, torch.Tensor] | None = None,
    names: Mapping[str, str] | None = None,
    bounds: Mapping[str, torch.Tensor] | None = None,
    expected: Mapping[str, torch.Tensor | None] | None = None,
) -> Check:
    """(c) every live filter's re-measured mean ReLU activation is 1 within ``tol``.

    ``expected``: a residual stream's sites share one scale per channel, so their means are promised
    values, not 1 (``LayerScales.expected``); each is checked as its ratio to the promise, within ``tol``.

    ``bounds`` (``normalize.float32_bounds``): a nearly silent filter whose bound exceeds ``tol`` is held to
    its bound instead, the deviation float32 arithmetic can produce there, and the detail says how many.

    ``dead`` lists each layer's dead filters (from the statistics); without it, ``rule`` decides on
    the measured means (an audit). A failure names the worst filter -- its layer as
    ``features.N (convB_I)`` with ``names``, its mean and, with ``scales``, its amplification -- and
    the fix.
    """
    desc = DESCRIPTIONS["means"]
    found = _deviations(means, dead, tol=tol, rule=rule, bounds=bounds, expected=expected)
    worst, live, n_dead, per_layer, widened, beyond = found
    if not live or not torch.cat(live).numel():
        return Check("means", desc, FAIL, None, tol, "every filter is dead: nothing was measured")
    allv = torch.cat(live)
    figure, layer, index = worst
    figure = float("nan") if figure == float("inf") else max(figure, 0.0)
    status = FAIL if beyond else _status(figure, tol)
    if not layer:  # every live filter is held to its float32 bound
        layer = next(iter(means))
    label = f"{layer} ({names[layer]})" if names and layer in names else layer
    where = f"worst: {label} filter {index}, mean {float(means[layer][index]):.6g}"
    promised_worst = expected.get(layer) if expected is not None else None
    if promised_worst is not None:
        where += f" (promised {float(promised_worst[index]):.6g}: a residual stream's)"
    if scales is not None and layer in scales:
        where += f", amplified {1 / float(scales[layer][index]):.3g}x by its scale {float(scales[layer][index]):.3g}"
    on_streams = expected is not None and any(expected.get(n) is not None for n in means)
    summary = (
        f"live filter means range {float(allv.min()):.6g} .. {float(allv.max()):.6g} "
        f"(median {float(allv.median()):.6g}"
        + ("; on residual streams, each mean over the one promised" if on_streams else "")
        + f"); {where}; {n_dead} dead filter(s) excluded"
    )
    if widened:
        summary += (
            f"; {widened} nearly silent filter(s) held to the deviation float32 arithmetic can produce in them "
            f"(its bound) instead of {tol:g}"
            + (f", {len(beyond)} beyond it ({'; '.join(beyond[:3])})" if beyond else "")
        )
    if status == FAIL:
        summary = _failure_advice(summary, allv, figure, layer, index, tol=tol, rule=rule, scales=scales)
    return Check("means", desc, status, figure, tol, "; ".join(x for x in (summary, detail) if x), per_layer)


_Deviations = tuple[tuple[float, str, int], list[torch.Tensor], int, dict[str, float], int, list[str]]


def _deviations(
    means: Mapping[str, torch.Tensor],
    dead: Mapping[str, list[int]] | None,
    *,
    tol: float,
    rule: DeadRule,
    bounds: Mapping[str, torch.Tensor] | None,
    expected: Mapping[str, torch.Tensor | None] | None,
) -> _Deviations:
    """``check_means``' measurements: the worst live filter (deviation, layer, index), the live means, the dead
    count, the worst deviation per layer, and the filters held to their float32 bound (how many; those beyond)."""
    worst: tuple[float, str, int] = (-1.0, "", -1)
    live, n_dead = [], 0
    per_layer: dict[str, float] = {}
    widened, beyond = 0, []
    for name, mean in means.items():
        m = mean.double()
        mask = rule.live_given(m, dead[name] if dead is not None else None)
        promised = expected.get(name) if expected is not None else None
        if promised is not None:  # a stream's site: its ratio to the promised mean is checked against 1
            m = torch.where(mask, m / promised.double().to(m.device).clamp_min(torch.finfo(torch.float64).tiny), m)
        n_dead += int((~mask).sum())
        if bounds is not None and name in bounds:
            b = bounds[name].double().to(m.device)
            wide = mask & (b > tol)
            widened += int(wide.sum())
            for i in torch.nonzero(wide).flatten().tolist():
                if not float((m[i] - 1).abs()) <= float(b[i]):
                    beyond.append(
                        f"{name} filter {i}: |mean - 1| {float((m[i] - 1).abs()):.3g} > bound {float(b[i]):.3g}"
                    )
            live.append(m[wide])
            mask = mask & ~wide
        if mask.any():
            dev = (m - 1).abs().masked_fill(~mask, -1.0).nan_to_num(nan=float("inf"))
            i = int(dev.argmax())
            per_layer[name] = float("nan") if float(dev[i]) == float("inf") else float(dev[i])
            live.append(m[mask])
            if float(dev[i]) > worst[0]:
                worst = (float(dev[i]), name, i)
    return worst, live, n_dead, per_layer, widened, beyond


def _failure_advice(
    summary: str,
    allv: torch.Tensor,
    figure: float,
    layer: str,
    index: int,
    *,
    tol: float,
    rule: DeadRule,
    scales: Mapping[str, torch.Tensor] | None,
) -> str:
    """A failed means check's ``summary`` with its likely cause and fix: not normalized at all, float32
    rounding in a nearly silent filter, or weights, images or policy other than the statistics'."""
    if float((allv - 1).abs().median()) > max(10 * tol, 1e-2):
        return "NOT normalized: " + summary
    if scales is not None and layer in scales:
        # a nearly silent filter has a scale far below its layer's: float32 rounding, amplified by 1 / scale
        s = scales[layer].double()
        relative = float(s.median() / s[index]) if float(s[index]) > 0 else float("inf")
        if figure <= FLOAT32_MEAN_ERROR * max(relative, 1.0):
            summary += (
                f"; float32 cannot normalize a nearly silent filter (amplified {relative:.3g}x its layer's median) "
                f"to {tol:g}: count it as dead with a larger --rel-eps (now {rule.rel_eps:g}), or measure and "
                "verify with --precision fp64"
            )
        else:
            summary += (
                f"; not a rounding effect (that filter is amplified only {relative:.3g}x its layer's median): the "
                "checkpoint's weights, the images or the measurement policy differ from those of the statistics"
            )
    return summary


# How far float32 rounding moves an ordinary filter's re-measured mean from 1 (2.5e-5 measured on random-weight
# VGGs, see defaults.py); a filter amplified r times its layer's median scale, about r times as far. A failure
# beyond that is no rounding effect: other weights, other images or another policy than the statistics'.
FLOAT32_MEAN_ERROR = 1e-4


def check_fold(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, rtol: float = DEFAULT_RTOL
) -> Check:
    """(d) the checkpoint equals ``fold(original, stats)`` recomputed, tensor by tensor (``expected`` may be a
    ``normalize.LazyFold``: each tensor computed as it is compared, a rescaled weight a block of rows at a time)."""
    desc = DESCRIPTIONS["fold"]
    if set(actual) != set(expected):
        missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
        return Check("fold", desc, FAIL, None, rtol, f"keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    errs = {}
    for k in expected:
        blocks = expected.rows(k) if isinstance(expected, LazyFold) else None
        if blocks is not None:  # a rescaled weight, a block of rows at a time: the same figure, no copy of it
            original, rows = blocks
            if tuple(actual[k].shape) != tuple(original.shape):
                errs[k] = float("inf")
                continue
            errs[k] = 0.0
            for i, block in rows:
                err = _elementwise_err(actual[k][i : i + block.shape[0]], block)
                if not err <= errs[k]:  # NaN wins
                    errs[k] = err
            continue
        v = expected[k]
        if not v.is_floating_point():
            errs[k] = 0.0 if torch.equal(actual[k], v) else float("inf")
        elif tuple(actual[k].shape) != tuple(v.shape):
            errs[k] = float("inf")
        else:
            errs[k] = _elementwise_err(actual[k], v)
    worst = max(errs, key=lambda k: errs[k])
    status = _status(errs[worst], rtol)
    detail = f"worst tensor {worst}"
    a = actual[worst]
    e = expected[worst] if status == FAIL else a  # (a LazyFold computes it: only when it is reported)
    if status == FAIL and a.is_floating_point() and a.shape == e.shape and e.numel():
        # the element itself: a relative error against an expected 0 is no figure a reader can use
        diff = (a.double() - e.double()).abs().reshape(-1)
        i = int(diff.nan_to_num(nan=float("inf")).argmax())
        where = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), tuple(e.shape))) if e.ndim else ()
        detail += f": element {list(where)} is {float(a.reshape(-1)[i]):.6g} where the fold gives {float(e.reshape(-1)[i]):.6g}"
    return Check("fold", desc, status, errs[worst], rtol, detail, errs)


# The proof: the four checks in order, on models. ``verify`` (on files) and ``api.verify_models`` (on models)
# both call ``prove``; each builds its inputs, this runs the checks.


@dataclass(frozen=True)
class Criteria:
    """What passes: ``rtol`` for (a), (b) and (d); ``means_tol`` for |mean - 1| in (c), where ``rule`` says
    which filters are dead when no statistics do."""

    rtol: float = DEFAULT_RTOL
    means_tol: float = DEFAULT_MEANS_TOL
    rule: DeadRule = DeadRule()


@dataclass(frozen=True)
class Normalized:
    """The model under test, run as its user runs it, and its tensors."""

    model: nn.Module
    topology: Topology  # its structure, its norms with the parameters a fold may have given them
    state_dict: Mapping[str, torch.Tensor]  # its tensors in the model's own layout (the float32 bounds read them)
    include_classifier: bool = False  # its classifier's activations were normalized too: (c) checks them
    features_only: bool = False  # no classifier: its output is its last activation, which (a) checks
    stored: Mapping[str, torch.Tensor] | None = None  # its tensors as written, which (d) compares; None: state_dict
    layout: Callable[[StateDict], Mapping[str, torch.Tensor]] | None = None  # the fold in ``stored``'s layout


@dataclass(frozen=True)
class Original:
    """The model before normalization: (a) and (b) run it, (d) folds its tensors."""

    model: nn.Module
    topology: Topology  # analyzed with add_affine=True: its sites and activation calls
    state_dict: Mapping[str, torch.Tensor]  # what the fold starts from
    # why the statistics were not measured on these weights, if they were not; asked after (a) and (b), so
    # a hash computed in the background overlaps with them
    stats_mismatch: Callable[[], str | None] | None = None


@dataclass(frozen=True)
class Scales:
    """The normalization claimed: each site's scales, dead filters and promised mean (``LayerScales``)."""

    layers: Mapping[str, LayerScales]  # keyed by ``topology``'s conv paths
    topology: Topology  # the structure they were computed on: the fold's


@dataclass(frozen=True)
class Probe:
    """The input of (a) and (b): a few images, or ``probe_input``; ``source`` says which in their details."""

    x: torch.Tensor
    source: str


@dataclass(frozen=True)
class Images:
    """The batches (c) re-measures the means on: ``(images, classes)``, the images on the model's device in
    its dtype, ``classes`` their class indices (with ``num_classes``: class-balanced means are checked) or None."""

    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]
    num_classes: int = 0
    note: Callable[[int], str] | None = None  # what the images were, given how many the witness saw


@dataclass(frozen=True)
class Proof:
    """The checks (activations, logits, fold, means) and what (c) re-measured, by the normalized model's paths."""

    checks: list[Check]
    means: dict[str, torch.Tensor] | None = None  # every witnessed site's (class-balanced with classes)
    num_images: int = 0
    dead: dict[str, list[int]] | None = None  # the statistics' dead filters; None without scales


def prove(
    normalized: Normalized,
    original: Original | None,
    scales: Scales | None,
    *,
    probe: Probe | None,
    images: Images | Check,
    criteria: Criteria = Criteria(),
) -> Proof:
    """The four checks of a normalization: (a) activations and (b) logits on ``probe`` (needed with ``original``)
    against ``original``,
    (d) the stored tensors against the fold of ``original`` by ``scales`` recomputed, (c) the means the witness
    re-measures on ``images`` against 1 (against their promised values on residual streams).

    Without ``original`` (a), (b), (d) are not run; without ``scales`` (a), (d) are not run and (c) is an audit:
    ``criteria.rule`` decides which filters are dead, and residual streams' ReLUs, whose means are a stream
    policy's, are left out. Statistics measured on other weights than the original's
    (``Original.stats_mismatch``) fail (a) and (d), and (c) is then an audit too. ``images`` may be the means
    check itself, where there are none (not run) or they cannot be measured as asked (a failure).
    """
    with one_thread():  # a 2-image probe and passes over memory: a second thread spins more than it helps
        checks, mismatch = _against_original(normalized, original, scales, probe, criteria.rtol)
    claimed = scales if mismatch is None else None
    if isinstance(images, Check):
        return Proof([*checks, images])
    means, num_images, check = _means(normalized, claimed, images, criteria)
    dead = _by_normalized_path(scales, normalized, "dead") if scales is not None else None
    return Proof([*checks, check], means, num_images, dead)


def site_pairs(statistics: Topology, normalized: Topology, include_classifier: bool) -> list[tuple[str, str]]:
    """(the statistics' conv path, the normalized model's) of each site, in forward order: they differ for a
    BN-folded Gatys export of a ``_bn`` arch."""
    a = [*statistics.sites, *(statistics.fc_sites if include_classifier else ())]
    b = [*normalized.sites, *(normalized.fc_sites if include_classifier else ())]
    return [(x.conv, y.conv) for x, y in zip(a, b, strict=True)]


def _against_original(
    normalized: Normalized, original: Original | None, scales: Scales | None, probe: Probe | None, rtol: float
) -> tuple[list[Check], str | None]:
    """(a) activations, (b) logits, (d) fold; and why the statistics are not the original's, if they are not."""
    if original is None:
        return [not_run(n, DESCRIPTIONS[n], "needs --original") for n in ("activations", "logits", "fold")], None
    if probe is None:
        raise ValueError("prove: an original needs a probe, the input (a) and (b) compare the models on")
    param = next(normalized.model.parameters(), None)
    x = probe.x.to(param.device) if param is not None else probe.x
    scale_t = {n: s.scale for n, s in scales.layers.items()} if scales is not None else None
    checks = check_function(
        original.model,
        normalized.model,
        scale_t,
        x,
        rtol=rtol,
        logits=not normalized.features_only,
        inputs=probe.source,
        topologies=(original.topology, normalized.topology),
    )
    if scales is None or scale_t is None:
        return [*checks, not_run("fold", DESCRIPTIONS["fold"], "needs --stats")], None
    mismatch = original.stats_mismatch() if original.stats_mismatch is not None else None
    if mismatch is not None:
        return [
            *(failed(c.name, mismatch) if c.name == "activations" else c for c in checks),
            failed("fold", mismatch),
        ], (mismatch)
    fold_args = (original.state_dict, scale_t, scales.topology)
    expected: Mapping[str, torch.Tensor]
    if normalized.layout is None:  # compared as computed: no second copy of the checkpoint held
        expected = LazyFold(*fold_args, features_only=normalized.features_only)
    else:
        expected = normalized.layout(fold_state_dict(*fold_args, features_only=normalized.features_only))
    stored = normalized.stored if normalized.stored is not None else normalized.state_dict
    return [*checks, check_fold(stored, expected, rtol=rtol)], None


def _means(
    normalized: Normalized, scales: Scales | None, images: Images, criteria: Criteria
) -> tuple[dict[str, torch.Tensor], int, Check]:
    """(c): the witness re-measures every site's means on ``images`` (``witness.activation_means``: the model's
    whole forward, hooks of its own, nothing of the measuring path); the claimed dead filters are excluded."""
    topo = normalized.topology
    sites = [*topo.sites, *(topo.fc_sites if normalized.include_classifier else ())]
    seen = activation_means(
        normalized.model,
        {s.conv: s.call for s in sites},
        images.batches,
        num_classes=images.num_classes,
        total=None if normalized.features_only else topo.activation_calls,
    )
    if seen.num_images == 0:
        raise DataError("no images to re-measure the means on")
    plain = {s.conv: seen.mean(s.conv) for s in sites}
    means = {s.conv: seen.balanced_mean(s.conv) for s in sites} if images.num_classes else plain
    notes = [images.note(seen.num_images)] if images.note is not None else []
    checked = means
    if scales is None:  # an audit: a residual stream's ReLUs were promised their share of its scale, not 1
        streams = {k for stream in topo.streams for k in stream.sites}
        if streams & set(means):
            checked = {k: m for k, m in means.items() if k not in streams}
            notes.append(
                f"{len(streams)} ReLUs on residual streams not audited (their means are the stream policy's, "
                "not 1: give --stats to check them)"
            )
    check = check_means(
        checked,
        _by_normalized_path(scales, normalized, "dead") if scales is not None else None,
        tol=criteria.means_tol,
        rule=criteria.rule,
        detail="; ".join(n for n in notes if n),
        scales=_by_normalized_path(scales, normalized, "scale") if scales is not None else None,
        names=topo.names,
        # from the model's own weights and the witnessed means: what float32 can hold in each filter
        bounds=float32_bounds(normalized.state_dict, topo, plain),
        expected=_by_normalized_path(scales, normalized, "expected") if scales is not None else None,
    )
    return means, seen.num_images, check


def _by_normalized_path(scales: Scales, normalized: Normalized, what: str) -> dict[str, Any]:
    """Each site's ``LayerScales`` field ``what`` (dead, scale, expected) keyed by the normalized model's paths."""
    pairs = site_pairs(scales.topology, normalized.topology, normalized.include_classifier)
    return {b: getattr(scales.layers[a], what) for a, b in pairs}
