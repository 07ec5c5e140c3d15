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
import logging
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import vggnorm
from vggnorm.errors import CheckpointError, VggnormError

# vggnorm's shape inference tries input sizes a model may not take; torch logs each failed fake run
logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)

OUTPUT_RTOL = 1e-10
MEANS_TOL = 1e-9
STATS_RTOL = 1e-9
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


def channel_means(t: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but 1 (images and positions), float64."""
    t = t.detach().to(torch.float64)
    if t.dim() == 1:
        raise AssertionError(f"activation output without a batch dimension: {tuple(t.shape)}")
    dims = [d for d in range(t.dim()) if d != 1]
    return t.mean(dim=dims)


def hooked_forward(model: nn.Module, x: torch.Tensor, paths: Iterable[str]) -> tuple[object, dict]:
    """Run ``model(x)`` once with forward hooks on ``paths``: (output, path -> [channel means per call])."""
    means: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    handles = []
    for p in means:
        module = model.get_submodule(p)

        def hook(_m, _inp, out, p=p):
            means[p].append(channel_means(out))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, means


def dead_mask(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dead, ambiguous): dead when mean <= max(1e-6, 1e-3 * median of the positive means)."""
    pos = means[means > 0]
    median = pos.median() if pos.numel() else torch.tensor(0.0, dtype=torch.float64)
    threshold = max(DEAD_ABS, DEAD_REL * float(median))
    dead = means <= threshold
    ambiguous = (means > threshold / AMBIGUOUS) & (means <= threshold * AMBIGUOUS) & (means > 0)
    return dead, ambiguous


@dataclass
class Outcome:
    accepted: bool
    refusal: str = ""  # "node: reason" of the first refusal, or why it counts as refused
    reason: str = ""  # the first refusal's reason (for counting)
    problems: list[str] = field(default_factory=list)
    sites: tuple = ()

    def categories(self) -> list[str]:
        return sorted({p[1 : p.index("]")] for p in self.problems if p.startswith("[")})

    def describe(self) -> str:
        if not self.accepted:
            return f"refused ({self.refusal})" + (f"; problems: {self.problems}" if self.problems else "")
        return "accepted, exact" if not self.problems else "accepted, NOT exact:\n  " + "\n  ".join(self.problems)


def _bug(stage: str, exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(exc, limit=-3)).strip().splitlines()
    return f"[crash] {stage} raised {type(exc).__name__} (not a VggnormError): {exc}\n    " + "\n    ".join(tb[-6:])


def check_contract(
    model: nn.Module,
    x: torch.Tensor,
    *,
    add_affine: bool = False,
    unscaled: Iterable[str] | None = None,
    unscaled_of=None,
    required_sites: Iterable[str] = (),
) -> Outcome:
    """Check ``model`` against the contract on the batch ``x``.

    ``unscaled``: activation paths whose site's output reaches the model's output uncompensated
    (vggnorm must leave them at scale 1). ``unscaled_of(sites)`` computes that set from the
    analysis' sites instead. ``required_sites``: activation paths that must be sites when accepted.
    """
    try:
        topo = vggnorm.analyze(model, add_affine=add_affine)
    except VggnormError as e:
        return Outcome(False, refusal=f"analyze raised {type(e).__name__}: {e}", reason="analyze raised")
    except Exception as e:
        return Outcome(False, refusal="analyze crashed", problems=[_bug("analyze", e)])
    sites = tuple(topo.all_sites)

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

    out = Outcome(True, sites=sites)
    problems = out.problems
    relus = [s.relu for s in sites]
    for path in required_sites:
        if path not in relus:
            problems.append(
                f"[missing-site] {path} is a conv/linear -> [norm] -> activation site but the analysis did not list it"
            )
    if len(set(relus)) != len(relus):
        problems.append(f"[twice] an activation module is listed for two sites: {relus}")
    paths = sorted(set(relus))

    x = x.to(torch.float64)
    try:
        ref_out, ref_means = hooked_forward(model, x, paths)
    except Exception as e:  # the model itself (not vggnorm) failed: a gallery/generator bug
        raise AssertionError(f"the model does not run on the input: {e}") from e
    for p in paths:
        if len(ref_means[p]) != 1:
            problems.append(f"[twice] site activation {p} fires {len(ref_means[p])} times per forward (expected once)")
    if unscaled is None:
        unscaled = unscaled_of(sites) if unscaled_of is not None else ()
    unscaled = set(unscaled)

    # include_classifier only where there are Linear sites: with none, normalize_model(include_classifier=True)
    # rejects the statistics measure_means(include_classifier=True) gave (test_gallery checks that apart)
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
    try:
        normalized = vggnorm.normalize_model(model, stats, include_classifier=fc, add_affine=add_affine)
    except VggnormError as e:
        problems.append(f"[late-error] accepted, but normalize_model raised {type(e).__name__}: {e}")
        return out
    except Exception as e:
        problems.append(_bug("normalize_model", e))
        return out

    # 1. outputs unchanged
    with torch.no_grad():
        again = model(x)
    new_out, new_means = hooked_forward(normalized, x, paths)
    a, b, c = _outputs(ref_out), _outputs(new_out), _outputs(again)
    if len(a) != len(b):
        problems.append(f"[output] the normalized model returns {len(b)} tensors, the original {len(a)}")
    for i, (t0, t1, t2) in enumerate(zip(a, b, c, strict=False)):
        if t0.shape != t1.shape:
            problems.append(f"[output] output {i}: shape {tuple(t1.shape)} != {tuple(t0.shape)}")
            continue
        scale = max(float(t0.abs().max()), 1e-300) if t0.numel() else 1.0
        if t0.numel() and float((t2 - t0).abs().max()) / scale > OUTPUT_RTOL:
            problems.append(f"[model] output {i}: the ORIGINAL model is not deterministic (or was modified)")
        rel = float((t1 - t0).abs().max()) / scale if t0.numel() else 0.0
        if not rel <= OUTPUT_RTOL:
            problems.append(f"[output] output {i} changed: max abs diff / max abs = {rel:.3g}")

    # 2./3. means, measured by our hooks
    for s in sites:
        p = s.relu
        if len(ref_means.get(p, ())) != 1 or len(new_means.get(p, ())) != 1:
            continue  # reported above
        before, after = ref_means[p][0], new_means[p][0]
        label = f"site {s.conv} -> {p}"
        if s.conv not in measured:
            problems.append(f"[stats] {label}: no statistics under key {s.conv!r} (keys: {sorted(measured)})")
        else:
            m = torch.as_tensor(measured[s.conv], dtype=torch.float64).reshape(-1)
            if m.shape != before.shape:
                problems.append(
                    f"[stats] {label}: statistics have shape {tuple(m.shape)}, the activation {tuple(before.shape)}"
                )
            else:
                rel = float((m - before).abs().max()) / max(float(before.abs().max()), 1e-12)
                if not rel <= STATS_RTOL:
                    problems.append(
                        f"[stats] {label}: measure_means differs from the model run as written (rel {rel:.3g}): "
                        f"stats {m.tolist()} vs hooks {before.tolist()}"
                    )
        if s.out_channels != before.numel():
            problems.append(f"[stats] {label}: out_channels {s.out_channels} but the activation has {before.numel()}")
        if after.shape != before.shape:
            problems.append(f"[output] {label}: activation shape changed")
            continue
        dead, ambiguous = dead_mask(before)
        unchanged = (after - before).abs() <= MEANS_TOL * torch.clamp(before.abs(), min=1.0)
        one = (after - 1).abs() <= MEANS_TOL
        if p in unscaled:
            bad = ~unchanged
            want = "unchanged (its output reaches the model output)"
        else:
            bad = torch.where(ambiguous, ~(one | unchanged), torch.where(dead, ~unchanged, ~one))
            want = "1 for live channels, unchanged for dead ones"
        if bool(bad.any()):
            idx = bad.nonzero().flatten().tolist()[:6]
            problems.append(
                f"[means] {label}: means after normalization should be {want}; channels {idx}: "
                f"before {[round(float(before[i]), 12) for i in idx]}, after {[round(float(after[i]), 12) for i in idx]}"
            )
    return out
