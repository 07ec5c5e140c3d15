"""An independent float64 oracle for vggnorm's contract, checked from the outside.

Only the public API is used (``analyze``, ``measure_means``, ``normalize_model``, the errors); the
means are measured with our own forward hooks on the activation modules the analysis names, during
a plain ``model(x)`` call, so the check is "what the model computes when run as written".

``check_contract`` returns an ``Outcome``: refused (with the first refusal) or accepted, with the list
of contract violations found (empty: exact). It never raises for a vggnorm bug; a non-vggnorm
exception out of vggnorm is itself a violation.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import vggnorm
from vggnorm.errors import CheckpointError, VggnormError

# vggnorm's shape inference tries input sizes a model may not take; torch logs each failed fake run
logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)

OUTPUT_RTOL = 1e-10
MEANS_TOL = 1e-9
STATS_RTOL = 1e-9
# an activation after normalization vs before / divisor, elementwise, relative to the channel's largest value
ACT_RTOL = 1e-9
DEAD_ABS = 1e-6
DEAD_REL = 1e-3
# a channel whose mean is within this factor of the dead threshold may be called either way
AMBIGUOUS = 2.0


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: these tensors are tiny, and on a shared 2-core machine threads cost 4-10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def images(size: int = 16, batch: int = 4, seed: int = 1234, channels: int = 3) -> torch.Tensor:
    """Smooth, positive-ish float64 images (bilinear upsampling of a coarse random grid)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, 4, 4, generator=g, dtype=torch.float64) * 1.5 - 0.25
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm statistics and affine parameters (so no norm is the identity), random PReLU
    slopes; float64, eval mode."""
    g = torch.Generator().manual_seed(seed + 1)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        with torch.no_grad():
            t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo)

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            uniform(m.running_mean, -0.3, 0.3)
            uniform(m.running_var, 0.4, 1.6)
        if (
            isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
            and getattr(m, "weight", None) is not None
        ):
            uniform(m.weight, 0.5, 1.5)
            if m.bias is not None:
                uniform(m.bias, -0.2, 0.2)
        if isinstance(m, nn.PReLU):
            uniform(m.weight, 0.05, 0.4)
    return model.double().eval()


def _outputs(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o)]
    return []


def dead_mask(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dead, ambiguous): dead when mean <= max(1e-6, 1e-3 * median of the positive means)."""
    pos = means[means > 0]
    median = pos.median() if pos.numel() else torch.tensor(0.0, dtype=torch.float64)
    threshold = max(DEAD_ABS, DEAD_REL * float(median))
    dead = means <= threshold
    ambiguous = (means > threshold / AMBIGUOUS) & (means <= threshold * AMBIGUOUS) & (means > 0)
    return dead, ambiguous


# ---------------------------------------------------------------- every activation call, recorded by us

# the calls the contract counts (``Site.call`` indexes them): these functions called directly in forward code,
# and the modules (nn.ReLU calls F.relu, nn.LeakyReLU F.leaky_relu, nn.PReLU F.prelu). Inside our
# ``__torch_function__`` the mode is off, so what these functions call in turn is not counted again.
ACT_FUNCS: dict = {
    F.relu: "ReLU",
    F.relu_: "ReLU",
    torch.relu: "ReLU",
    torch.relu_: "ReLU",
    torch.Tensor.relu: "ReLU",
    torch.Tensor.relu_: "ReLU",
    F.leaky_relu: "LeakyReLU",
    F.prelu: "PReLU",
    torch.prelu: "PReLU",
}
ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU)


@dataclass
class Call:
    """One call of a positively homogeneous activation: its kind and (a clone of) its output."""

    activation: str  # "ReLU" | "LeakyReLU" | "PReLU"
    out: torch.Tensor


class ActivationCalls(TorchFunctionMode):
    """Records every call of the activation functions above, in execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        try:
            kind = ACT_FUNCS.get(func)
        except TypeError:  # an unhashable callable
            kind = None
        if kind is not None and isinstance(out, torch.Tensor):
            self.calls.append(Call(kind, out.detach().clone()))
        return out


def recorded_forward(model: nn.Module, x: torch.Tensor) -> tuple[object, list[Call], dict[str, list[int]]]:
    """``model(x)`` once, as written: (output, every activation call in order, module path -> the call
    indices each of its calls made (one per call of the module), for the activation modules)."""
    mode = ActivationCalls()
    of_module: dict[str, list[int]] = {}
    handles = []
    for path, m in model.named_modules():
        if not isinstance(m, ACT_MODULES):
            continue
        starts: list[int] = []

        def pre(_m, _inp, starts=starts):
            starts.append(len(mode.calls))

        def post(_m, _inp, _out, path=path, starts=starts):
            start = starts.pop()
            of_module.setdefault(path, []).extend(range(start, len(mode.calls)))

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad(), mode:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, mode.calls, of_module


def channel_dim(kind: str) -> int:
    """A conv site's channels are dimension 1; a Linear site's the last (a Linear on (N, ..., C))."""
    return -1 if kind == "linear" else 1


def per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as (channels, everything else)."""
    return t.detach().to(torch.float64).movedim(dim, 0).reshape(t.shape[dim], -1)


def channel_means(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mean over every dimension but ``dim`` (images and positions), float64."""
    if t.dim() < 2:
        raise AssertionError(f"activation output without a batch dimension: {tuple(t.shape)}")
    return per_channel(t, dim).mean(dim=1)


# ---------------------------------------------------------------- the contract


@dataclass
class Outcome:
    accepted: bool
    refusal: str = ""  # "node: reason" of the first refusal, or why it counts as refused
    reason: str = ""  # the first refusal's reason (for counting)
    problems: list[str] = field(default_factory=list)
    sites: tuple = ()
    streams: tuple = ()
    calls: dict = field(default_factory=dict)  # site key -> its call index (as resolved)
    n_calls: int = 0  # activation calls in one forward (accepted models)

    def categories(self) -> list[str]:
        return sorted({p[1 : p.index("]")] for p in self.problems if p.startswith("[")})

    def describe(self) -> str:
        if not self.accepted:
            return f"refused ({self.refusal})" + (f"; problems: {self.problems}" if self.problems else "")
        return "accepted, exact" if not self.problems else "accepted, NOT exact:\n  " + "\n  ".join(self.problems)


def _bug(stage: str, exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(exc, limit=-3)).strip().splitlines()
    return f"[crash] {stage} raised {type(exc).__name__} (not a VggnormError): {exc}\n    " + "\n    ".join(tb[-6:])


def _as_calls(items: Iterable, of_module: dict[str, list[int]]) -> set[int]:
    """Activation call indices, from call indices and activation module paths (all their calls)."""
    out: set[int] = set()
    for it in items:
        if isinstance(it, int):
            out.add(it)
        else:
            out |= set(of_module.get(it, ()))
    return out


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0


def expected_divisors(members: list[torch.Tensor], policy: str) -> list[list[set[float]]]:
    """For the sites of one group (one site alone, or a stream's members in forward order) and their
    measured means: per member, per channel, the divisors the contract allows (several only where a
    channel's mean lies in the dead rule's ambiguity band).

    Alone: the mean where live, 1 where dead. A stream: one divisor per channel for all members, the
    geometric mean of the members' means over the members where the channel is live (1 where it is live
    at none); ``policy="last"``: the last member's mean where live there, else 1."""
    masks = [dead_mask(m) for m in members]
    channels = members[0].numel()
    per_channel_sets: list[set[float]] = []
    for c in range(channels):
        live, amb = [], []
        for k, (dead, ambiguous) in enumerate(masks):
            if bool(ambiguous[c]):
                amb.append(k)
            elif not bool(dead[c]):
                live.append(k)
        if len(members) == 1 or policy == "last":
            k = len(members) - 1
            m = float(members[k][c])
            if k in amb:
                per_channel_sets.append({m, 1.0})
            else:
                per_channel_sets.append({m} if k in live else {1.0})
            continue
        options: set[float] = set()
        for chosen in itertools.product((False, True), repeat=min(len(amb), 6)):
            ks = live + [k for k, on in zip(amb, chosen, strict=False) if on]
            options.add(_geomean([float(members[k][c]) for k in ks]))
        per_channel_sets.append(options)
    return [per_channel_sets for _ in members]


def _divisor_ok(before: torch.Tensor, after: torch.Tensor, d: float) -> bool:
    """after == before / d elementwise (one channel's values), relative to the channel's largest value."""
    scale = float(before.abs().max()) if before.numel() else 0.0
    if scale == 0.0:
        return float(after.abs().max()) == 0.0 if after.numel() else True
    return float((after * d - before).abs().max()) <= ACT_RTOL * scale


def _fitted_divisor(before: torch.Tensor, after: torch.Tensor) -> float:
    """The least-squares d with after ~ before / d (nan where ``after`` is 0)."""
    den = float((before * after).sum())
    num = float((before * before).sum())
    return num / den if den != 0.0 and num != 0.0 else float("nan")


def check_contract(
    model: nn.Module,
    x: torch.Tensor,
    *,
    add_affine: bool = False,
    unscaled: Iterable | None = None,
    unscaled_of=None,
    may_unscale_of=None,
    required_sites: Iterable | str = (),
    streams: Iterable[Iterable[int]] | None = None,
    stream_bounds_of=None,
    stream_scale: str = "geometric",
    check_scales: bool = False,
) -> Outcome:
    """Check ``model`` against the contract on the batch ``x``.

    Activation calls are named by their index among all calls of positively homogeneous activations in
    one ``model(x)`` (``Site.call``), or by an activation module's path (meaning all its calls).

    ``unscaled``: calls whose site's output reaches the model's output uncompensated (they must keep
    divisor 1; with a stream, all its members). ``unscaled_of(sites)`` computes that set from the
    analysis' sites instead; ``may_unscale_of(sites)``: calls that may be left at 1 or normalized (the
    outputs check decides; not required as sites). ``required_sites``: calls that must be sites when accepted, or ``"all"``:
    every activation call but the unscaled ones. ``streams``: when given, the streams of two or more
    sites the analysis must report, as groups of calls (exactly these). ``stream_bounds_of(sites)``: groups
    of calls, each reported stream must lie within one (a stream joins only what adds join).
    ``stream_scale``: the policy passed to ``normalize_model`` ("geometric", the default, or "last").
    ``vggnorm.scales`` is compared with the contract's divisors where there are streams, or with ``check_scales``.
    """
    try:
        topo = vggnorm.analyze(model, add_affine=add_affine)
    except VggnormError as e:
        return Outcome(False, refusal=f"analyze raised {type(e).__name__}: {e}", reason="analyze raised")
    except Exception as e:
        return Outcome(False, refusal="analyze crashed", problems=[_bug("analyze", e)])
    sites = tuple(topo.all_sites)
    topo_streams = tuple(getattr(topo, "streams", ()) or ())

    if topo.refusals or not sites:
        first = topo.refusals[0] if topo.refusals else None
        out = Outcome(False, refusal=f"{first.node}: {first.reason}" if first else "no site", sites=sites)
        out.reason = first.reason if first else "no site"
        try:
            vggnorm.measure_means(model, [x], include_classifier=True, add_affine=add_affine)
        except VggnormError as e:
            if first is not None and first.node not in str(e):
                out.problems.append(f"[message] the error does not name the refused node {first.node!r}: {e}")
            if first is None and not isinstance(e, CheckpointError):
                out.problems.append(
                    f"[message] a model without sites raised {type(e).__name__}, not CheckpointError: {e}"
                )
        except Exception as e:
            out.problems.append(_bug("measure_means (refused model)", e))
        else:
            out.problems.append("[message] measure_means did not raise on a refused model")
        return out

    out = Outcome(True, sites=sites, streams=topo_streams)
    problems = out.problems
    x = x.to(torch.float64)
    try:
        ref_out, ref_calls, of_module = recorded_forward(model, x)
    except Exception as e:  # the model itself (not vggnorm) failed: a gallery/generator bug
        raise AssertionError(f"the model does not run on the input: {e}") from e

    out.n_calls = len(ref_calls)

    # ---- every site is one activation call, with its channels
    call_of: dict[str, int] = {}
    by_call: dict[int, object] = {}
    for s in sites:
        label = f"site {s.conv} -> {s.relu}"
        c = getattr(s, "call", None)
        if c is None:  # an analysis from before per-call sites: its activation module, called once
            made = of_module.get(s.relu, [])
            if len(made) != 1:
                problems.append(f"[twice] site activation {s.relu} makes {len(made)} activation calls per forward")
                continue
            c = made[0]
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < len(ref_calls):
            problems.append(f"[call] {label}: call {c!r} is not one of the {len(ref_calls)} activation calls")
            continue
        if c in by_call:
            problems.append(f"[twice] {label}: call {c} is also the call of site {by_call[c].conv}")
            continue
        if s.conv in call_of:
            problems.append(f"[twice] two sites have the key {s.conv!r}")
            continue
        call_of[s.conv], by_call[c] = c, s
        t = ref_calls[c].out
        if t.dim() < 2:
            problems.append(f"[call] {label}: call {c}'s output has no batch dimension: {tuple(t.shape)}")
            del call_of[s.conv], by_call[c]
            continue
        n = t.shape[channel_dim(s.kind)]
        if s.out_channels != n:
            problems.append(f"[call] {label}: out_channels {s.out_channels} but call {c} has {n} channels")
            del call_of[s.conv], by_call[c]
            continue
        act = getattr(s, "activation", None)
        # (a subclass of nn.ReLU may be reported by its class name: only the three names are compared)
        if act in ("ReLU", "LeakyReLU", "PReLU") and act != ref_calls[c].activation:
            problems.append(f"[call] {label}: activation {act!r} but call {c} is a {ref_calls[c].activation}")
    out.calls = dict(call_of)
    site_of = {s.conv: s for s in sites if s.conv in call_of}

    unscaled_calls = _as_calls(
        unscaled if unscaled is not None else (unscaled_of(sites) if unscaled_of is not None else ()), of_module
    )
    may_unscale = _as_calls(may_unscale_of(sites) if may_unscale_of is not None else (), of_module)
    if isinstance(required_sites, str):
        assert required_sites == "all", required_sites
        required = set(range(len(ref_calls))) - unscaled_calls - may_unscale
    else:
        required = _as_calls(required_sites, of_module)
    for c in sorted(required - set(by_call)):
        problems.append(
            f"[missing-site] activation call {c} (a {ref_calls[c].activation}, {tuple(ref_calls[c].out.shape)}) "
            f"is a site but the analysis did not list it"
        )

    # ---- streams: groups of sites sharing one divisor
    groups: list[list[str]] = []  # site keys, forward order; singletons for the sites in no stream
    in_stream: set[str] = set()
    for st in topo_streams:
        keys = list(getattr(st, "sites", ()))
        missing = [k for k in keys if k not in site_of]
        if missing:
            problems.append(f"[stream] stream {keys}: {missing} are not sites (with a call)")
        keys = [k for k in keys if k in site_of]
        again = [k for k in keys if k in in_stream]
        if again:
            problems.append(f"[stream] sites {again} are in two streams")
        keys = [k for k in dict.fromkeys(keys) if k not in in_stream]
        if len({site_of[k].out_channels for k in keys}) > 1:
            problems.append(f"[stream] stream {keys}: its sites have different channel counts")
            continue
        for path in (*getattr(st, "writers", ()), *getattr(st, "readers", ())):
            try:
                model.get_submodule(path)
            except AttributeError:
                problems.append(f"[stream] stream {keys}: writer/reader {path!r} is not a module of the model")
        if keys:
            in_stream |= set(keys)
            groups.append(sorted(keys, key=lambda k: call_of[k]))
    groups += [[k] for k in site_of if k not in in_stream]
    reported = {frozenset(call_of[k] for k in g) for g in groups if len(g) > 1}
    if streams is not None:
        wanted = {frozenset(g) for g in streams if len(tuple(g)) > 1}
        if reported != wanted:
            problems.append(
                f"[stream] streams (as activation calls): expected {sorted(sorted(g) for g in wanted)}, "
                f"the analysis reports {sorted(sorted(g) for g in reported)}"
            )
    if stream_bounds_of is not None:
        bounds = [set(b) for b in stream_bounds_of(sites)]
        for g in reported:
            if not any(g <= b for b in bounds):
                problems.append(
                    f"[stream] stream of calls {sorted(g)} joins sites that no residual add joins "
                    f"(adds join {[sorted(b) for b in bounds]})"
                )

    # ---- statistics: measure_means must give the means of the model run as written
    before_means = {k: channel_means(ref_calls[c].out, channel_dim(site_of[k].kind)) for k, c in call_of.items()}
    fc = any(s.kind == "linear" for s in sites)
    try:
        stats = vggnorm.measure_means(model, [x], include_classifier=fc, add_affine=add_affine)
        measured = stats.means()
    except VggnormError as e:
        problems.append(f"[late-error] accepted by analyze, but measure_means raised {type(e).__name__}: {e}")
        return out
    except Exception as e:
        problems.append(_bug("measure_means", e))
        return out
    for k, before in before_means.items():
        label = f"site {k} (call {call_of[k]})"
        if k not in measured:
            problems.append(f"[stats] {label}: no statistics under key {k!r} (keys: {sorted(measured)})")
            continue
        m = torch.as_tensor(measured[k], dtype=torch.float64).reshape(-1)
        if m.shape != before.shape:
            problems.append(
                f"[stats] {label}: statistics have shape {tuple(m.shape)}, the activation {tuple(before.shape)}"
            )
            continue
        rel = float((m - before).abs().max()) / max(float(before.abs().max()), 1e-12)
        if not rel <= STATS_RTOL:
            problems.append(
                f"[stats] {label}: measure_means differs from the model run as written (rel {rel:.3g}): "
                f"stats {m.tolist()} vs ours {before.tolist()}"
            )

    extra = {} if stream_scale == "geometric" else {"stream_scale": stream_scale}
    try:
        normalized = vggnorm.normalize_model(model, stats, include_classifier=fc, add_affine=add_affine, **extra)
    except VggnormError as e:
        problems.append(f"[late-error] accepted, but normalize_model raised {type(e).__name__}: {e}")
        return out
    except Exception as e:
        problems.append(_bug("normalize_model", e))
        return out

    # ---- (a) outputs unchanged
    with torch.no_grad():
        again = model(x)
    new_out, new_calls, _ = recorded_forward(normalized, x)
    a, b, c2 = _outputs(ref_out), _outputs(new_out), _outputs(again)
    if len(a) != len(b):
        problems.append(f"[output] the normalized model returns {len(b)} tensors, the original {len(a)}")
    for i, (t0, t1, t2) in enumerate(zip(a, b, c2, strict=False)):
        if t0.shape != t1.shape:
            problems.append(f"[output] output {i}: shape {tuple(t1.shape)} != {tuple(t0.shape)}")
            continue
        scale = max(float(t0.abs().max()), 1e-300) if t0.numel() else 1.0
        if t0.numel() and float((t2 - t0).abs().max()) / scale > OUTPUT_RTOL:
            problems.append(f"[model] output {i}: the ORIGINAL model is not deterministic (or was modified)")
        rel = float((t1 - t0).abs().max()) / scale if t0.numel() else 0.0
        if not rel <= OUTPUT_RTOL:
            problems.append(f"[output] output {i} changed: max abs diff / max abs = {rel:.3g}")
    if len(new_calls) != len(ref_calls):
        problems.append(
            f"[call] the normalized model makes {len(new_calls)} activation calls, the original {len(ref_calls)}"
        )
        return out

    # ---- (b)-(d): each site's activation, after = before / divisor, with the divisor the contract says
    allowed: dict[str, list[set[float]]] = {}
    for g in groups:
        calls = {call_of[k] for k in g}
        if calls & unscaled_calls:
            sets = [[{1.0} for _ in range(site_of[g[0]].out_channels)] for _ in g]
        else:
            sets = expected_divisors([before_means[k] for k in g], stream_scale)
            if calls & may_unscale:
                sets = [[opts | {1.0} for opts in member] for member in sets]
        allowed.update(zip(g, sets, strict=True))
    fitted: dict[str, list[float]] = {}
    for k, c in call_of.items():
        s = site_of[k]
        label = f"site {k} -> {s.relu} (call {c})"
        t0, t1 = ref_calls[c].out, new_calls[c].out
        if t0.shape != t1.shape:
            problems.append(f"[output] {label}: activation shape {tuple(t1.shape)} != {tuple(t0.shape)}")
            continue
        dim = channel_dim(s.kind)
        p0, p1 = per_channel(t0, dim), per_channel(t1, dim)
        before, after = p0.mean(1), p1.mean(1)
        fitted[k] = [_fitted_divisor(p0[i], p1[i]) for i in range(p0.shape[0])]
        bad = [i for i in range(p0.shape[0]) if not any(_divisor_ok(p0[i], p1[i], d) for d in allowed[k][i])]
        if bad:
            idx = bad[:6]
            problems.append(
                f"[means] {label}: after normalization the activation should be before / "
                f"{'1 (its output reaches the model output)' if c in unscaled_calls else 'the divisor the contract says'}"
                f"; channels {idx}: mean before {[round(float(before[i]), 12) for i in idx]}, "
                f"after {[round(float(after[i]), 12) for i in idx]}, divisor allowed "
                f"{[sorted(round(d, 12) for d in allowed[k][i]) for i in idx]}, found {[fitted[k][i] for i in idx]}"
            )
    # (d) one divisor per channel along a stream (what the fitted divisors say, whatever the allowed ones)
    for g in groups:
        if len(g) < 2 or any(k not in fitted for k in g):
            continue
        for i in range(site_of[g[0]].out_channels):
            ds = [fitted[k][i] for k in g if not math.isnan(fitted[k][i])]
            if ds and max(ds) - min(ds) > ACT_RTOL * max(abs(d) for d in ds):
                problems.append(f"[stream] stream {g}: channel {i} is divided by different values at its sites: {ds}")
                break

    # ---- the scales vggnorm reports are those it applied (the default stream policy; where there are streams:
    # elsewhere the means check says it, and each call of the analysis costs)
    if stream_scale == "geometric" and (reported or check_scales):
        try:
            reported_scales = vggnorm.scales(model, stats, include_classifier=fc)
        except Exception as e:
            problems.append(f"[scales] vggnorm.scales raised {type(e).__name__}: {e}")
            reported_scales = {}
        for k, ls in reported_scales.items():
            if k not in allowed or call_of[k] in unscaled_calls | may_unscale:
                continue
            sc = torch.as_tensor(ls.scale, dtype=torch.float64).reshape(-1)
            if sc.numel() != len(allowed[k]):
                problems.append(f"[scales] site {k}: {sc.numel()} scales for {len(allowed[k])} channels")
                continue
            bad = [
                i
                for i in range(sc.numel())
                if not any(abs(float(sc[i]) - d) <= STATS_RTOL * abs(d) for d in allowed[k][i])
            ]
            if bad:
                problems.append(
                    f"[scales] site {k}: vggnorm.scales gives {[float(sc[i]) for i in bad[:6]]} at channels "
                    f"{bad[:6]}, the contract {[sorted(allowed[k][i]) for i in bad[:6]]}"
                )
    return out
