"""vggnorm's op handlers, one per op family (convs and Linears, norms, activations, pooling and other ops that commute, shape ops, joins and pieces, arithmetic, gates), registered for torch's layers and functions.

Each takes ``(walk, node, op, states)`` and returns the state of the node's output (``analysis.registry``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import Target

from vggnorm.analysis import registry
from vggnorm.analysis.shapes import shape_of
from vggnorm.analysis.values import Pieces, State, Unit, Value
from vggnorm.compat import batch_norm_class, has_forward_hooks, instance_norm_class

if TYPE_CHECKING:
    from vggnorm.analysis.topology import Walk

HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
HOMOGENEOUS_FNS: set[Target] = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.leaky_relu,
    F.prelu,
    torch.prelu,
    "relu",
    "relu_",
}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LayerNorm)
POOLS = (nn.MaxPool2d, nn.AvgPool2d)
POOL_FNS: set[Target] = {F.max_pool2d, F.avg_pool2d, torch.max_pool2d}
ADD_AFFINE_NOTE = (
    "the output file then holds its weight (1) and bias (0), so the module must be built with affine=True to load it"
)
_COMMUTING = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.ZeroPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)
_COMMUTING_FNS: set[Target] = {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.dropout,
    torch.max_pool2d,
    "contiguous",
    "clone",
    "detach",
}
_NOT_HOMOGENEOUS = (
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardtanh,
    nn.Tanh,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.Softmax,
    nn.LogSoftmax,
)
_NOT_HOMOGENEOUS_FNS: set[Target] = {
    F.relu6,
    F.gelu,
    F.silu,
    F.hardtanh,
    F.elu,
    F.selu,
    F.mish,
    F.hardswish,
    F.softplus,
}
_NOT_HOMOGENEOUS_FNS |= {torch.tanh, F.tanh, "tanh"}
_SIGMOIDS = (nn.Sigmoid, nn.Hardsigmoid)  # a gate, or not homogeneous
_SIGMOID_FNS: set[Target] = {torch.sigmoid, F.sigmoid, "sigmoid"}
_RESHAPES: set[Target] = {
    "view",
    "reshape",
    torch.reshape,
    "transpose",
    torch.transpose,
    "permute",
    torch.permute,
    "flatten",
}
_RESHAPES |= {torch.flatten, "unsqueeze", torch.unsqueeze, "squeeze", torch.squeeze}
_PRODUCTS: set[Target] = {operator.mul, torch.mul, "mul"}
_QUOTIENTS: set[Target] = {operator.truediv, torch.div, "div"}
_ARITHMETIC: set[Target] = {operator.add, operator.sub, torch.add, torch.sub, "add", "sub", *_PRODUCTS, *_QUOTIENTS}
_ARITHMETIC.discard(torch.div)  # torch.div's calls are no arithmetic the analysis follows (as before)
_NEGATIONS: set[Target] = {operator.neg, torch.neg, "neg"}


def _first(states: list[State]) -> State:
    return states[0] if states else None


def _scaled(states: list[State]) -> list[Value]:
    return [s for s in states if isinstance(s, Value) and s.scaled]


# ---- convs and Linears: compensate their input's scales, carry their own -----------------------------


_COMPUTED = (
    "computes its weights when called (a parametrization such as weight_norm or spectral_norm, or a forward "
    "hook): the stored tensors are not the ones it applies, so rescaling them is not exact",
    "remove it first (torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'), "
    "torch.nn.utils.remove_weight_norm), and normalize the plain module",
)


def _computed_parameters(m: nn.Module) -> bool:
    """Whether ``m``'s parameters are not used as stored: parametrized, or changed by hooks before it runs."""
    return bool(getattr(m, "parametrizations", None) or has_forward_hooks(m))


def weighted(walk: Walk, node: torch.fx.Node, m: nn.Conv2d | nn.Linear, states: list[State]) -> State:
    """A Conv2d or Linear: compensates the scales it reads (its input columns), and its output is a new
    scale variable (its weight rows and bias)."""
    path, x = str(node.target), _first(states)
    base = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
    if _computed_parameters(m):
        walk.refuse(node, *_COMPUTED)
        return None
    if type(m).forward is not base.forward:
        walk.refuse(
            node,
            f"{type(m).__name__} overrides {base.__name__}.forward (weight standardization?): its stored weights "
            "are not applied as they are, so rescaling them is not exact",
        )
        return None
    if isinstance(x, Value) and x.scaled:
        if x.grid is not None:
            walk.problem(node, x, "reads channels spread over several dimensions")
        elif isinstance(m, nn.Conv2d) and x.positions > 1:
            walk.problem(node, x, "reads flattened scaled channels")
        elif isinstance(m, nn.Linear) and x.positions == 1 and len(shape_of(node.args[0]) or ()) != 2:
            walk.problem(
                node, x, "is applied over the last dimension of channel-scaled features, not over the channels"
            )
        else:
            groups = m.groups if isinstance(m, nn.Conv2d) else 1
            walk.compensations.append((path, x.labels, x.positions, groups, x.via, x.max_factor))
    in_c = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
    out_c = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    if isinstance(m, nn.Linear) and len(shape_of(node) or (0, 0)) != 2:
        # features on the last dim of an (N, ..., F) output: not channels vggnorm can scale (no site), but
        # an activation after it that is not homogeneous is refused by name, as after a conv
        return Value((None,) * out_c, pre=node.name, producer=path, in_channels=in_c)
    return Value(walk.fresh(path, "rows", out_c), pre=node.name, producer=path, in_channels=in_c)


# ---- norms: an eval BatchNorm absorbs its input's scales; a per-channel affine norm carries its own -------


def _batch_statistics(m: nn.Module) -> bool:
    """Whether a BatchNorm normalizes with each batch's own statistics (InstanceNorm's per-image ones are fine)."""
    if not isinstance(m, batch_norm_class()):
        return False
    return bool(m.training or getattr(m, "running_mean", None) is None)


def _is_layernorm2d(m: nn.Module) -> bool:
    """torchvision's ``LayerNorm2d`` (ConvNeXt's), recognized by its class, not by its shapes."""
    cls = type(m)
    return cls.__name__ == "LayerNorm2d" and cls.__module__.startswith("torchvision.")


def _norm_forward(m: nn.Module) -> Any:
    """The forward a norm must have for vggnorm to know what it computes: its torch (or torchvision) class's."""
    if _is_layernorm2d(m):
        return type(m).forward
    for base in (batch_norm_class(), nn.GroupNorm, instance_norm_class(), nn.LayerNorm):
        if isinstance(m, base):
            for cls in type(m).__mro__:
                if cls.__module__.startswith("torch.nn.") and "forward" in cls.__dict__:
                    return cls.__dict__["forward"]
    return type(m).forward


def norm_channels(m: nn.Module, node: torch.fx.Node | None) -> int:
    """A norm's channels: its own count (BatchNorm, InstanceNorm, GroupNorm), else its output's dim 1."""
    return int(getattr(m, "num_features", 0) or getattr(m, "num_channels", 0) or 0) or (
        (shape_of(node) or (0, 0))[1] if node is not None else 0
    )


def _channelwise(node: torch.fx.Node, m: nn.Module) -> bool:
    """Whether ``m``'s affine parameters act per channel (dim 1) of this input, by the norm's definition
    (its class and the dims it normalizes), never by a coincidence of sizes."""
    if not isinstance(m, nn.LayerNorm):
        return True  # BatchNorm, GroupNorm, InstanceNorm: one weight and bias per channel
    if _is_layernorm2d(m):  # torchvision's: permutes the channels last and normalizes over them alone
        return True
    shape = shape_of(node.args[0])
    # a plain LayerNorm over the features of an (N, features) input: the features are its channels
    return shape is not None and len(shape) == 2 and tuple(m.normalized_shape) == (shape[1],)


def _norm_refusal(walk: Walk, node: torch.fx.Node, m: nn.Module) -> bool:
    """Refuse a norm vggnorm cannot rescale at all; whether it did."""
    if _computed_parameters(m):
        walk.refuse(node, *_COMPUTED)
    elif _batch_statistics(m):
        walk.refuse(
            node,
            "normalizes with the statistics of each batch (track_running_stats=False, or training mode), so "
            "every mean after it depends on the batch size and on which images share a batch",
            "call model.eval() on a model with running statistics, or build the norm with "
            "track_running_stats=True and fill them",
        )
    elif type(m).forward is not _norm_forward(m):
        walk.refuse(
            node,
            f"{type(m).__name__} overrides the forward of the normalization it subclasses: vggnorm cannot tell "
            "what its affine parameters act on",
        )
    else:
        return False
    return True


def norm(walk: Walk, node: torch.fx.Node, m: nn.Module, states: list[State]) -> State:
    """BatchNorm, GroupNorm, InstanceNorm, LayerNorm: absorbs its input's scales (an eval BatchNorm with
    affine parameters) or refuses them; its output is a scale variable (its weight and bias)."""
    path, x = str(node.target), _first(states)
    if _norm_refusal(walk, node, m):
        return None
    affine = getattr(m, "affine", getattr(m, "elementwise_affine", True)) and getattr(m, "weight", None) is not None
    fix = f"build it with affine=True (weight 1, bias 0: the same function), or pass --add-affine ({ADD_AFFINE_NOTE})"
    if isinstance(x, Value) and x.scaled:
        if not isinstance(m, batch_norm_class()) or x.grid is not None or x.positions > 1:
            walk.problem(
                node,
                x,
                "receives per-channel scaled channels: a normalization by each input's own statistics is not "
                "invariant to them (GroupNorm and LayerNorm mix channels; epsilon makes InstanceNorm inexact)",
            )
        elif not affine and not walk.add_affine:
            walk.problem(
                node,
                x,
                "receives per-channel scaled channels and has no affine parameters to absorb them (affine=False)",
                fix,
            )
        else:  # an eval BatchNorm absorbs its input's scales exactly: running mean / s, weight * s
            walk.absorbs.append((path, x.labels))
    channels = norm_channels(m, node)
    if not affine and walk.add_affine:
        walk.affine_added[path] = channels
    producer = x.producer if isinstance(x, Value) and x.pre and x.producer and not x.norm else path
    in_c = x.in_channels if isinstance(x, Value) and producer != path else channels
    value = Value(
        walk.fresh(path, "affine", channels),
        pre=node.name,
        producer=producer,
        norm=path,
        norm_type=type(m).__name__,
        in_channels=in_c,
    )
    # a norm that cannot carry a scale keeps its variable, so that what it joins is the same with or without
    # --add-affine: a site whose scale it would have to carry is refused (``topology``), and a site right
    # after it is refused here with the activation named
    if not _channelwise(node, m):
        why = "normalizes over more than the channels (its affine parameters are not per channel)"
        walk.blocked_vars[path] = (walk.label(node), why, "")
        return dataclasses.replace(value, blocked=why)
    if not affine and not walk.add_affine:
        why = "has no affine parameters to absorb the scale (affine=False)"
        walk.blocked_vars[path] = (walk.label(node), why, fix)
        return dataclasses.replace(value, blocked=why, fix=fix)
    return dataclasses.replace(value, added_affine=not affine)


# ---- activations: the sites; and the nonlinearities that are not homogeneous ---------------------------


def activation_module(walk: Walk, node: torch.fx.Node, m: nn.Module, states: list[State]) -> State:
    """A call of a ReLU, LeakyReLU or PReLU module."""
    if type(m).forward not in (nn.ReLU.forward, nn.LeakyReLU.forward, nn.PReLU.forward):
        walk.refuse(node, f"{type(m).__name__} overrides the forward of the activation it subclasses")
        walk.ordinal += 1
        return None
    return walk.activation(node, type(m).__name__, m, _first(states))


def activation_function(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """A call of ``F.relu``, ``torch.relu``, ``x.relu_()``, ``F.leaky_relu``, ``F.prelu`` ..."""
    kind = "LeakyReLU" if target is F.leaky_relu else "PReLU" if target in (F.prelu, torch.prelu) else "ReLU"
    return walk.activation(node, kind, None, _first(states))


def not_homogeneous(walk: Walk, node: torch.fx.Node, op: nn.Module | Target, states: list[State]) -> State:
    """A nonlinearity that is not positively homogeneous (ReLU6, GELU, SiLU, Tanh, ...): no scale may reach
    it, and the filters before it cannot be normalized."""
    x = _first(states)
    what = "is not positively homogeneous (f(s x) != s f(x) for s > 0)"
    if isinstance(x, Value) and x.scaled:
        walk.problem(node, x, f"receives per-channel scaled channels and {what}")
    elif isinstance(x, Value) and x.pre and x.producer:
        walk.refuse(
            node,
            f"{what}: the filters of {x.producer} before it cannot be normalized",
            "vggnorm normalizes ReLU, LeakyReLU and PReLU networks",
        )
    return None


def _gate(node: torch.fx.Node, x: State) -> bool:
    """A sigmoid that gates: it reads a conv's output whose input scales were compensated (nothing scaled),
    and only multiplies other values (squeeze-and-excitation), so no activation of the model is skipped."""
    return (
        isinstance(x, Value)
        and bool(x.pre)
        and not x.scaled
        and bool(node.users)
        and all(u.op in ("call_function", "call_method") and u.target in _PRODUCTS for u in node.users)
    )


def sigmoid(walk: Walk, node: torch.fx.Node, op: nn.Module | Target, states: list[State]) -> State:
    """A sigmoid: a gate on a value whose scale was compensated (squeeze-and-excitation), else a nonlinearity."""
    return None if _gate(node, _first(states)) else not_homogeneous(walk, node, op, states)


def hardsigmoid(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """``F.hardsigmoid``: a gate, else an op vggnorm does not know."""
    if _gate(node, _first(states)):
        return None
    x = _first(states)
    if isinstance(x, Value) and x.grid is not None:
        walk.problem(node, states, "uses channels spread over several dimensions")
        return None
    return unknown_function(walk, node, target, states)


# ---- ops that commute with a per-channel scale: pooling, dropout, padding, identity ----------------------


def _max_factor(node: torch.fx.Node, kernel: Any, stride: Any, overlap: int | None = None) -> float:
    """How many times a max pooling can raise a channel's mean over positions: each output is at most the sum
    of its window, and each input lies in at most ``ceil(k / s)`` windows per dimension, so the mean out is at
    most that overlap times (inputs / outputs) the mean in (4 overlaps when the windows are unknown)."""
    shape_in, shape_out = shape_of(node.args[0]), shape_of(node)
    if not shape_in or not shape_out or len(shape_in) < 3:
        return float("inf")
    ratio = math.prod(shape_in[2:]) / max(1, math.prod(shape_out[2:] if len(shape_out) > 2 else (1,)))
    if overlap is None:
        ks = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel) if kernel else ()
        ss = (stride, stride) if isinstance(stride, int) else tuple(stride) if stride else ks
        overlap = math.prod(-(-k // s) for k, s in zip(ks, ss, strict=False)) if ks and ss else 4
    return overlap * ratio


def commuting_module(walk: Walk, node: torch.fx.Node, m: nn.Module, states: list[State]) -> State:
    """Pooling, dropout, padding, identity: each channel keeps its scale."""
    x = _first(states)
    if isinstance(x, Value) and x.grid is not None:
        walk.problem(node, x, "pools channels spread over several dimensions")
        return None
    if isinstance(x, Value) and not x.pre:
        maximum = isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))
        factor = _max_factor(node, getattr(m, "kernel_size", None), getattr(m, "stride", None)) if maximum else 1.0
        return x.through(str(node.target), factor)
    return x  # a pre-activation value stays one: max(s x) = s max(x)


def commuting_function(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """``F.max_pool2d``, ``F.avg_pool2d``, ``F.dropout``, ``x.contiguous()`` ...: each channel keeps its scale."""
    x = _first(states)
    if not isinstance(x, Value) or x.pre:
        return x
    if target in (F.max_pool2d, torch.max_pool2d, F.adaptive_max_pool2d):
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size")
        stride = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
        if target is F.adaptive_max_pool2d:
            kernel = stride = None
        return x.through(node.name, _max_factor(node, kernel, stride or kernel))
    return x.through(node.name)


def pad(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """``F.pad``: with zeros, or copies of the values (reflect, replicate, circular), each channel keeps its scale."""
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if mode != "constant" or not value:
        return commuting_function(walk, node, target, states)
    return unknown_function(walk, node, target, states)


def reduction(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """``mean`` or ``amax`` over positions (global pooling): each channel keeps its scale."""
    x = _first(states)
    if isinstance(x, Value) and x.positions == 1:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        ndim = len(shape_of(node.args[0]) or ())
        dims = [dims] if isinstance(dims, int) else dims
        if isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) and d % ndim > 1 for d in dims):
            if x.pre:
                return x
            return x.through(node.name, _max_factor(node, None, None, 1) if target in ("amax", torch.amax) else 1.0)
    return unknown_function(walk, node, target, states)


def commutes(walk: Walk, node: torch.fx.Node, op: nn.Module | Target, states: list[State]) -> State:
    """A user's op that keeps each channel's scale in place, ``f(x / s) = f(x) / s`` for every positive
    per-channel ``s`` (dim 1), reading one scaled input (``registry.register_module``)."""
    x = _first(states)
    if any(isinstance(s, Value) and s.scaled for s in states[1:]):
        walk.problem(node, states, "receives scaled channels in an input other than its first")
        return None
    if not isinstance(x, Value):
        return None
    shape_in, shape_out = shape_of(node.args[0]) if node.args else None, shape_of(node)
    if x.grid is not None or x.positions > 1 or not shape_in or not shape_out or shape_out[:2] != shape_in[:2]:
        walk.problem(
            node, x, "keeps each channel's scale only for channels on dim 1, kept in place, and here they are not"
        )
        return None
    if x.pre:
        return x
    name = str(node.target) if node.op == "call_module" else node.name
    return x.through(name, _max_factor(node, None, None))  # how it may raise a mean: as an unknown pooling


# ---- shape ops and views: flatten, reshape, transpose, permute, (un)squeeze ---------------------------


def flatten_module(walk: Walk, node: torch.fx.Node, m: nn.Flatten, states: list[State]) -> State:
    return _flatten(walk, node, _first(states), str(node.target), m.start_dim)


def reshape(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """``flatten``, ``view``, ``reshape``, ``transpose``, ``permute``, ``(un)squeeze``."""
    x = _first(states)
    if not isinstance(x, Value) or not x.scaled:
        return None
    if target in (torch.flatten, "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return _flatten(walk, node, x, node.name, start if isinstance(start, int) else -1)
    if target in ("view", "reshape", torch.reshape):
        return _flatten(walk, node, x, node.name, 1)
    return _reshaped(walk, node, x, node.name)


def _flatten(walk: Walk, node: torch.fx.Node, x: State, where: str, start_dim: int = 1) -> State:
    if not isinstance(x, Value) or not x.scaled:
        return None if not isinstance(x, Value) else dataclasses.replace(x, pre="", producer="")
    shape = shape_of(node.args[0])
    out = shape_of(node)
    if x.grid is None and shape is not None and out is not None and start_dim == 1 and len(out) == 2:
        if out[0] == shape[0] and len(shape) == 2:
            return x.through(where)
        if out[0] == shape[0] and out[1] == math.prod(shape[1:]):
            return Value(x.labels, positions=x.positions * math.prod(shape[2:]), via=(*x.via, where))
    return _reshaped(walk, node, x, where)


def _reshaped(walk: Walk, node: torch.fx.Node, x: Value, where: str) -> State:
    """A view, reshape, transpose or permute that moves channels across dims (a channel shuffle): the
    labels are laid out as the value and moved by the same op; back on dim 1 alone, they are channels."""
    shape, out = shape_of(node.args[0]), shape_of(node)
    if shape is None or out is None or x.positions > 1 or len(shape) < 2 or len(out) < 2 or out[0] != shape[0]:
        walk.problem(node, x, "reshapes scaled channels in a way vggnorm cannot follow")
        return None
    grid = x.grid
    if grid is None and shape[1] != len(x.labels):
        walk.problem(node, x, "reshapes scaled channels in a way vggnorm cannot follow")
        return None
    if grid is None:
        grid = torch.arange(len(x.labels)).view(1, -1, *([1] * (len(shape) - 2))).expand(1, *shape[1:])
    target = node.target
    try:
        if target in ("transpose", torch.transpose):
            grid = grid.transpose(int(node.args[1]), int(node.args[2]))  # type: ignore[arg-type]
        elif target in ("permute", torch.permute):
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            grid = grid.permute(*[int(d) for d in dims])  # type: ignore[arg-type]
        else:  # view, reshape, flatten, (un)squeeze: the output's shape, as shape propagation found it
            grid = grid.reshape(1, *out[1:])
    except (TypeError, ValueError, RuntimeError, IndexError):
        walk.problem(node, x, "reshapes scaled channels in a way vggnorm cannot follow")
        return None
    if grid.dim() >= 2 and grid.shape[1] > 0:
        flat = grid.reshape(grid.shape[0], grid.shape[1], -1)
        first = flat[:, :, :1]
        if bool((flat == first).all()):  # each channel holds one label again: channels
            labels = tuple(x.labels[int(i)] for i in first.flatten().tolist())
            return Value(labels, via=(*x.via, where), max_factor=x.max_factor)
    return Value(x.labels, via=(*x.via, where), max_factor=x.max_factor, grid=grid.contiguous())


# ---- joins and pieces: cat along the channels, chunk, split, x[:, a:b] ----------------------------------


def cat(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """``torch.cat`` along the channels: each channel keeps its scale, in its new place."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    parts = [a for a in tensors if isinstance(a, torch.fx.Node)] if isinstance(tensors, (list, tuple)) else []
    parts_states = [walk.state.get(a) for a in parts]
    if not any(isinstance(s, Value) and s.scaled for s in parts_states):
        return None
    ndim = len(shape_of(node) or ())
    if (
        dim not in (1, 1 - ndim)
        or any(isinstance(s, Value) and (s.positions > 1 or s.grid is not None) for s in parts_states)
        or any(isinstance(s, Pieces) for s in parts_states)
    ):
        walk.problem(node, parts_states, "concatenates scaled channels along a dimension other than the channels")
        return None
    labels: list[Unit | None] = []
    for a, s in zip(parts, parts_states, strict=True):
        labels += list(s.labels) if isinstance(s, Value) else [None] * (shape_of(a) or (0, 0))[1]
    factor = max(s.max_factor for s in parts_states if isinstance(s, Value))
    pre = node.name if all(isinstance(s, Value) and s.pre for s in parts_states) else ""
    return Value(tuple(labels), pre=pre, via=(node.name,), max_factor=factor)


def split(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """``chunk`` and ``split`` along the channels: each piece keeps its channels' scales."""
    x = _first(states)
    if not isinstance(x, Value) or not x.scaled:
        return None
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    n = len(x.labels)
    ndim = len(shape_of(node.args[0]) or ())
    if dim not in (1, 1 - ndim) or x.grid is not None or x.positions > 1:
        walk.problem(node, x, "splits scaled channels along a dimension other than the channels")
        return None
    if target in ("chunk", torch.chunk) and isinstance(arg, int):
        step = -(-n // arg)
        sizes = [min(step, n - i) for i in range(0, n, step)]
    elif isinstance(arg, int):
        sizes = [min(arg, n - i) for i in range(0, n, arg)]
    elif isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg):
        sizes = list(arg)
    else:
        walk.problem(node, x, "splits scaled channels into sizes vggnorm cannot read")
        return None
    items, start = [], 0
    for size in sizes:
        items.append(Value(x.labels[start : start + size], pre=f"{node.name}.{start}" if x.pre else ""))
        start += size
    return Pieces(tuple(items))


def getitem(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """A piece of a split, or ``x[:, a:b]``: a slice of the channels."""
    x, index = _first(states), node.args[1]
    if isinstance(x, Pieces):
        return x.items[index] if isinstance(index, int) and -len(x.items) <= index < len(x.items) else None
    if not isinstance(x, Value) or not x.scaled:
        return None
    if (
        isinstance(index, tuple)
        and len(index) >= 2
        and index[0] == slice(None)
        and isinstance(index[1], slice)
        and all(i == slice(None) or i is Ellipsis for i in index[2:])
        and x.grid is None
        and x.positions == 1
    ):
        labels = x.labels[index[1]]
        return Value(labels, pre=f"{node.name}" if x.pre else "", via=(*x.via, node.name), max_factor=x.max_factor)
    walk.problem(node, x, "indexes scaled channels in a way vggnorm cannot follow")
    return None


# ---- arithmetic: constants, products with a gate, residual adds ----------------------------------------


def negation(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """``-x``: the constant -1, which keeps each channel's scale."""
    x = _first(states)
    if isinstance(x, Value) and x.scaled:
        return x if x.pre else x.through(node.name)  # -(x / s) = (-x) / s
    return unknown_function(walk, node, target, states)


def arithmetic(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """``+``, ``-``, ``*``, ``/`` of two operands: with a constant, with an unscaled gate, or a residual add."""
    if len(node.args) != 2:
        return unknown_function(walk, node, target, states)
    a, b = node.args
    values = [walk.state.get(c) if isinstance(c, torch.fx.Node) else None for c in (a, b)]
    constants = [c for c in (a, b) if not isinstance(c, torch.fx.Node)]
    if constants:
        return _with_constant(walk, node, target, values, constants[0])
    if target in _PRODUCTS or target in _QUOTIENTS:
        return _product(walk, node, target, values)
    return _sum(walk, node, target, values)


def _with_constant(walk: Walk, node: torch.fx.Node, target: Target, values: list[State], constant: Any) -> State:
    x = next((v for v in values if isinstance(v, Value)), None)
    if x is None or not x.scaled:
        return None  # a pre-activation value plus a constant: no longer one; nothing is scaled
    if not isinstance(constant, (int, float)) or isinstance(constant, bool):
        walk.problem(node, x, f"combines per-channel scaled channels with a {type(constant).__name__}")
        return None
    # (c x) / s = c (x / s) for any constant c, of either sign; so is (x / c) / s
    if target in _PRODUCTS or (target in _QUOTIENTS and node.args[1] is constant and constant != 0):
        return x.through(node.name) if not x.pre else x
    walk.problem(
        node,
        x,
        f"applies {_target_name(target)} with the constant {constant!r} to per-channel scaled channels: "
        "(x + c) / s != x / s + c, so the fold cannot keep the function",
    )
    return None


def _product(walk: Walk, node: torch.fx.Node, target: Target, values: list[State]) -> State:
    """A product with an unscaled tensor keeps the scales, per element: g (x / s) = (g x) / s (a gate)."""
    a, b = node.args
    scaled = _scaled(values)
    if len(scaled) == 1 and not (target in _QUOTIENTS and values[1] is scaled[0]):
        x = scaled[0]
        shape = shape_of(node)
        if x.grid is None and x.positions == 1 and shape is not None and shape == shape_of(a if values[0] is x else b):
            return dataclasses.replace(x, producer="") if x.pre else x.through(node.name)
    if scaled:
        walk.problem(
            node,
            scaled,
            f"applies {_target_name(target)} to per-channel scaled channels and another scaled tensor, or broadcasts them",
        )
    return None


def _sum(walk: Walk, node: torch.fx.Node, target: Target, values: list[State]) -> State:
    """add, sub: both sides must carry the same scales; a residual add joins them into one stream."""
    a, b = node.args
    name, scaled = _target_name(target), _scaled(values)
    xa, xb = (v if isinstance(v, Value) else None for v in values)
    if xa is None or xb is None or not (xa.scaled or xb.scaled or xa.pre or xb.pre):
        if scaled:
            walk.problem(
                node,
                scaled,
                f"{name}s per-channel scaled channels and a tensor that carries no scale (the image, a "
                "constant tensor?): (x + y) / s != x / s + y",
            )
        return None
    if (
        len(xa.labels) != len(xb.labels)
        or xa.grid is not None
        or xb.grid is not None
        or xa.positions != xb.positions
        or shape_of(a) != shape_of(b)
    ):
        walk.problem(node, scaled, f"{name}s per-channel scaled values of different layouts (broadcasting?)")
        return None
    if any((ua is None) != (ub is None) for ua, ub in zip(xa.labels, xb.labels, strict=True)):
        walk.problem(
            node,
            scaled,
            f"{name}s per-channel scaled channels and channels that carry no scale: both sides would need the "
            "same scales",
        )
        return None
    for ua, ub in zip(xa.labels, xb.labels, strict=True):
        if ua is not None and ub is not None:
            walk.union(ua, ub)
    pre = node.name if any(isinstance(v, Value) and v.pre for v in values) or scaled else ""
    return Value(
        xa.labels, pre=pre, positions=xa.positions, via=(node.name,), max_factor=max(xa.max_factor, xb.max_factor)
    )


# ---- what vggnorm does not know ----------------------------------------------------------------------


def _registration_fix(walk: Walk, node: torch.fx.Node) -> str:
    """How a user may vouch for the module of their own whose forward holds ``node``: one with no submodules
    (an op such as a blur, not a block of layers), which ``register_module`` would keep whole."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    module = walk.modules.get(stack[-1][0]) if stack else None
    if module is None or type(module).__module__.startswith(("torch.", "torchvision.")) or any(module.children()):
        return ""
    name = type(module).__name__
    return (
        f"it is called in {stack[-1][0]} ({name}): if {name} keeps each channel's scale in place "
        f"(f(x / s) = f(x) / s per channel), register it: vggnorm.analysis.register_module({name}, "
        "vggnorm.analysis.commutes)"
    )


def unknown_module(walk: Walk, node: torch.fx.Node, m: nn.Module, states: list[State]) -> State:
    """A module vggnorm has no handler for: refused if a scale reaches it, or if it follows a site's filters."""
    x = _first(states)
    if _scaled(states):
        walk.problem(
            node,
            states,
            f"receives per-channel scaled channels, and vggnorm does not know whether {type(m).__name__} "
            "commutes with a positive per-channel scale",
        )
    elif isinstance(x, Value) and x.pre and x.producer:
        walk.refuse(
            node,
            f"follows {x.producer}: vggnorm does not know whether {type(m).__name__} is positively homogeneous, "
            f"so the filters of {x.producer} cannot be normalized",
        )
    return None


def unknown_function(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """A function vggnorm has no handler for: refused if a scale reaches it."""
    scaled = _scaled(states)
    if scaled:
        walk.problem(
            node,
            scaled,
            "receives per-channel scaled channels, and vggnorm does not know whether it commutes with them",
            _registration_fix(walk, node),
        )
    return None


def inert(walk: Walk, node: torch.fx.Node, target: Target, states: list[State]) -> State:
    """``getattr``, ``size``, ``dim``: no tensor of the model's values."""
    return None


def _target_name(target: Target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


registry.builtin_modules((nn.Conv2d, nn.Linear), weighted)
registry.builtin_modules(NORMS, norm)
registry.builtin_modules(HOMOGENEOUS, activation_module, closed=True)
registry.builtin_modules(_COMMUTING, commuting_module)
registry.builtin_modules((nn.Flatten,), flatten_module)
registry.builtin_modules(_SIGMOIDS, sigmoid)
registry.builtin_modules(_NOT_HOMOGENEOUS, not_homogeneous)
registry.builtin_functions([operator.getitem], getitem, pieces=True, spread=True)
registry.builtin_functions(HOMOGENEOUS_FNS, activation_function, pieces=True, spread=True)
registry.builtin_functions(_SIGMOID_FNS, sigmoid, spread=True)
registry.builtin_functions([F.hardsigmoid], hardsigmoid, spread=True)
registry.builtin_functions(_NOT_HOMOGENEOUS_FNS, not_homogeneous, spread=True)
registry.builtin_functions(_COMMUTING_FNS, commuting_function, spread=True)
registry.builtin_functions([F.pad], pad)
registry.builtin_functions(_RESHAPES, reshape, spread=True)
registry.builtin_functions([torch.cat, torch.concat, torch.concatenate], cat)
registry.builtin_functions(["chunk", torch.chunk, "split", torch.split], split)
registry.builtin_functions(["mean", torch.mean, "amax", torch.amax], reduction)
registry.builtin_functions([getattr, "size", "dim"], inert)
registry.builtin_functions(_NEGATIONS, negation)
registry.builtin_functions(_ARITHMETIC, arithmetic)
