"""The structural analysis: which activations of a model can be normalized, and how the fold compensates.

``find_topology`` traces the model with ``torch.fx`` (its shapes from ``shapes.py``: no memory, no
arithmetic) and follows per-channel scales through the graph. Every model vggnorm handles, torchvision's
VGGs included, goes through this one analysis.

* A **site** is a *call* of a positively homogeneous activation (ReLU, LeakyReLU, PReLU: ``f(s x) = s f(x)``
  for ``s > 0``; a module, each call apart, or a function such as ``F.relu``) whose input every channel of
  which the fold can divide: a Conv2d/Linear output (divide its weight rows and bias), a per-channel
  affine norm's output (BatchNorm, GroupNorm, InstanceNorm, a channel-wise LayerNorm: divide its weight
  and bias), perhaps through ops that commute with the scale, or a sum or ``cat`` of such values.
* Each such output is a **scale variable** (its module: an ``Origin``), one unit per channel. A residual
  ``add`` of two scaled values joins their units: they must carry the same scale. The units a site reads
  are its scales; units joined to several sites' channels make a **stream** (ResNet's stages), whose
  shared scale a policy chooses (``core.fold._stream_scales``).
* The scale **flows** through ops that commute with it (pooling, dropout, padding, identity, flatten,
  ``cat``/``chunk``/``split``/slices along the channels, channel shuffles, constants, the activations
  themselves, a product with an unscaled gate) to the next Conv2d or Linear, which **compensates** its
  input columns (per group for a grouped conv; ``P`` columns per channel for a Linear after a flatten),
  or to an eval-mode BatchNorm, which **absorbs** it (``Absorb``: running mean / s, weight * s).
* Anything else a kept scale would reach is **refused**, by node and with the reason: an add of scaled
  and unscaled channels, a product of two scaled values, an activation that is not homogeneous, a
  GroupNorm/LayerNorm/InstanceNorm that receives a scale, a BatchNorm using batch statistics, a conv or
  norm called more than once, weights computed at call time, code the tracer cannot see through.
* **Every reader is accounted for.** Pass 1 gives every Conv2d, Linear and norm output a variable and
  walks the graph: the sites, the joins, and what each variable meets. The variables joined to a site are
  kept, less those whose scale reaches the model's output uncompensated (``left_unscaled``: the outputs
  stay unchanged). Pass 2 walks again with only the kept ones, so that every reader of a kept value -- a
  second activation, a side conv, an alias, an in-place ReLU's overwritten input, an add -- compensates
  it, passes it on, or is refused.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from vggnorm.analysis.shapes import Tracer, propagate_shapes, shape_of
from vggnorm.compat import batch_norm_class, has_forward_hooks, instance_norm_class
from vggnorm.errors import CheckpointError

HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LayerNorm)
COMMUTING = (
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
NOT_HOMOGENEOUS = (
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.Softmax,
    nn.LogSoftmax,
)
_HOMOGENEOUS_FNS = {F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.prelu, torch.prelu, "relu", "relu_"}
_NOT_HOMOGENEOUS_FNS = {
    F.relu6,
    F.gelu,
    F.silu,
    F.hardtanh,
    F.elu,
    F.selu,
    F.mish,
    F.hardswish,
    F.softplus,
    torch.sigmoid,
    torch.tanh,
    F.sigmoid,
    F.tanh,
    "sigmoid",
    "tanh",
}
_COMMUTING_FNS = {
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
_FLATTEN_FNS = {torch.flatten, "flatten", "view", "reshape", torch.reshape}
_CAT_FNS = {torch.cat, torch.concat, torch.concatenate}
_ARITHMETIC = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    "add",
    "sub",
    "mul",
    "div",
}
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_POOL_FNS = {F.max_pool2d, F.avg_pool2d, torch.max_pool2d}

ADD_AFFINE_NOTE = (
    "the output file then holds its weight (1) and bias (0), so the module must be built with affine=True to load it"
)


Run = tuple[str | None, int, int]  # (site key, first channel, count): channels of that site's scale; None: scale 1
Unit = tuple[str, int]  # (scale variable: the module whose output the fold divides, channel)


@dataclass(frozen=True)
class Site:
    """One measured activation call: the statistics' unit, whose output the fold divides by its scales.

    ``conv`` is the site's key in the statistics: the producing Conv2d/Linear's module path for a
    conv -> [norm] -> activation site (``features.0``, ``classifier.0``); the norm's path when a norm
    whose input is no conv's output feeds the activation (DenseNet's ``norm1``); otherwise the
    activation call's own label (a ReLU after a residual add: ``layer1.0.relu:2``, its second call).
    ``relu`` labels the activation call: a module's path (``:k`` for its k-th call when it is called
    several times) or, for a function, the module whose forward calls it and the function
    (``conv1.relu``). ``call`` is the call's index among every call of ReLU, LeakyReLU and PReLU (module
    or function) in one forward pass, in order: how the statistics and the witness find it at run time.
    ``bn`` is the normalization's path for a conv -> norm -> activation site.
    """

    conv: str
    relu: str
    bn: str | None
    in_channels: int
    out_channels: int
    kind: str = "conv"  # conv or linear (an (N, C) value: normalized with the classifier, on request)
    norm: str = ""  # the normalization's class name
    activation: str = "ReLU"  # the activation's class name
    added_affine: bool = False  # the norm had no affine parameters; --add-affine gave it weight 1, bias 0
    call: int = -1

    @property
    def signed(self) -> bool:
        """Whether the activation can be negative (LeakyReLU, PReLU): a mean at or below 0 is then legal."""
        return self.activation != "ReLU"


@dataclass(frozen=True)
class Compensation:
    """A Conv2d or Linear that reads scaled channels and multiplies its input columns by their scales.

    ``runs`` lists its input channels in order as ``(site key, first channel, count)``: those channels
    carry that site's scales from the first channel on; ``(None, 0, count)`` for channels that carry no
    scale (a ``cat`` with the image, say). ``positions`` is ``P``, the columns per channel of a Linear
    after a channel-major flatten.
    """

    module: str
    runs: tuple[Run, ...]
    positions: int = 1
    groups: int = 1
    via: tuple[str, ...] = ()  # the ops the scale passed through on its way here
    max_factor: float = 1.0  # max poolings on the way raise an input channel's mean at most this many times

    @property
    def pieces(self) -> tuple[tuple[str | None, int], ...]:
        """``(site key, count)`` per run."""
        return tuple((k, n) for k, _, n in self.runs)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for k, _, _ in self.runs if k is not None))


@dataclass(frozen=True)
class Origin:
    """A module whose output channels the fold divides: a Conv2d/Linear (``rows``: its weight rows and
    bias) or a per-channel affine norm (``affine``: its weight and bias); ``runs`` say by which scales."""

    module: str
    kind: str  # rows or affine
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Absorb:
    """An eval-mode BatchNorm that reads scaled channels and absorbs their scales exactly: its running mean
    is divided by them and its weight multiplied (``BN(x / s)`` with ``mean / s``, ``weight * s`` is ``BN(x)``)."""

    module: str
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Stream:
    """Sites that share one scale per channel, because residual adds join their values: on a ResNet stage,
    its first activation's output and every block's activation after the add. Their means cannot all be 1;
    the scale policy (``--stream-scale``) chooses one value per channel.

    ``classes[i][c]`` numbers the scale that channel ``c`` of ``sites[i]`` shares: the same number, the
    same scale. ``writers`` are the modules the fold divides by it, ``readers`` the layers that compensate.
    """

    sites: tuple[str, ...]
    classes: tuple[tuple[int, ...], ...]
    writers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """Why a node keeps the model from being normalized, and what would make it normalizable."""

    node: str
    reason: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}" + (f"; {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Topology:
    """The sites in forward order, what the fold divides and compensates, and the refusals (empty:
    normalizable)."""

    sites: tuple[Site, ...]
    classifier: str | None = None  # the first Linear after a flatten of scaled channels (fc6)
    classifier_in_features: int | None = None
    fc_sites: tuple[Site, ...] = ()  # (N, C) activation sites (fc6, fc7): normalized on request
    compensations: tuple[Compensation, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    names: dict[str, str] = field(default_factory=dict)  # conv path -> Gatys' name (conv1_1)
    # activations that would be sites, left unscaled because their scale reaches the model's output
    # with no layer after it to compensate (SqueezeNet's last ReLU): the outputs stay unchanged
    left_unscaled: tuple[str, ...] = ()
    # activation calls that are no site: their input is no conv, Linear or norm output (the image, say)
    not_sites: tuple[str, ...] = ()
    origins: tuple[Origin, ...] = ()
    absorbs: tuple[Absorb, ...] = ()
    streams: tuple[Stream, ...] = ()
    activation_calls: int = 0  # calls of ReLU, LeakyReLU and PReLU in one forward pass
    # --add-affine: the norms without affine parameters that carry or absorb a scale, and their channels
    added_affine: tuple[tuple[str, int], ...] = ()

    @property
    def positions_per_channel(self) -> int:
        """``P``: flattened positions per channel seen by the first Linear (7 * 7)."""
        for c in self.compensations:
            if c.module == self.classifier:
                return c.positions
        raise ValueError("this topology has no classifier")

    @property
    def all_sites(self) -> tuple[Site, ...]:
        return (*self.sites, *self.fc_sites)

    def stream_of(self, key: str) -> Stream | None:
        return next((s for s in self.streams if key in s.sites), None)

    def check(self) -> None:
        """Raise ``CheckpointError`` naming the refusals (at most three) when there are any."""
        if self.refusals:
            shown = "; ".join(str(r) for r in self.refusals[:3])
            more = f" (and {len(self.refusals) - 3} more)" if len(self.refusals) > 3 else ""
            raise CheckpointError(f"cannot normalize this model: {shown}{more}. `vggnorm inspect` lists every site")
        if not self.sites:
            raise CheckpointError("the model has no Conv2d -> activation sites to normalize")


# ---- the scale state of one value in the graph ---------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Val:
    """A value some of whose channels (dim 1) are divided by scales: ``labels[c]`` is channel ``c``'s unit
    (None: unscaled). ``pre`` (an id) marks a pre-activation value: a Conv2d/Linear/norm output, or a sum of
    them, that no activation has read yet; the first activation reading it is a site."""

    labels: tuple[Unit | None, ...]
    pre: str = ""
    producer: str = ""  # the module a classic site is keyed by (the conv before a norm); "" for a sum
    norm: str | None = None
    norm_type: str = ""
    added_affine: bool = False
    in_channels: int = 0
    blocked: str = ""  # why this value cannot be a site (a norm without affine parameters)
    fix: str = ""
    positions: int = 1  # > 1 after a channel-major flatten: each channel's P columns
    via: tuple[str, ...] = ()
    max_factor: float = 1.0
    grid: torch.Tensor | None = None  # while channels are spread over several dims: label ids laid out as the value

    @property
    def scaled(self) -> bool:
        return any(u is not None for u in self.labels)

    def through(self, name: str, max_factor: float = 1.0) -> _Val:
        return dataclasses.replace(self, via=(*self.via, name), max_factor=self.max_factor * max_factor)

    def read(self) -> _Val | None:
        """The value once an activation has read it: no longer a pre-activation."""
        out = dataclasses.replace(self, pre="", producer="", norm=None, norm_type="", blocked="", fix="")
        return out if out.scaled else None


@dataclass(frozen=True)
class _Tuple:
    """The pieces of a ``chunk`` or ``split`` along the channels."""

    items: tuple[_Val | None, ...]


_State = _Val | _Tuple | None  # None: carries no scale


def _units(x: _State) -> list[Unit]:
    if isinstance(x, _Tuple):
        return [u for i in x.items for u in _units(i)]
    return [u for u in x.labels if u is not None] if isinstance(x, _Val) else []


def find_topology(model: nn.Module, *, add_affine: bool = False) -> Topology:
    """Trace ``model`` and return its sites, what the fold divides and compensates, and its refusals
    (see the module docstring).

    ``add_affine`` accepts a norm without affine parameters as a site's norm, as if it had weight 1
    and bias 0 (``with_affine`` makes the model so). Nothing is refused by raising: the refusals are
    returned, and ``Topology.check()`` raises them.
    """
    try:
        graph = Tracer().trace(model)
    except Exception as e:  # the user's forward may raise anything under the tracer
        first = str(e).splitlines()[0] if str(e) else ""
        return Topology(
            (),
            refusals=(
                Refusal(
                    "<trace>",
                    f"torch.fx cannot trace the model ({type(e).__name__}: {first})",
                    "make forward traceable by torch.fx (no Python control flow on tensor values)",
                ),
            ),
        )
    try:
        propagate_shapes(model, graph)
    except CheckpointError as e:
        return Topology((), refusals=(Refusal("<trace>", str(e)),))
    # Pass 1 gives every Conv2d, Linear and norm output a scale variable and walks the graph: which
    # activations would be sites, which variables residual adds join, and what each variable meets. The
    # variables joined to a site are kept, except those whose scale reaches the model's output (left
    # unscaled: the outputs stay unchanged); pass 2 walks again with only them, so every reader of a
    # kept variable -- a second activation, a side conv, an alias, an add -- compensates it, passes it
    # on, or is refused.
    discovery = _Analysis(model, graph, add_affine, active=None)
    discovery.walk()
    active = discovery.wanted()
    reach = {discovery.find_var(v) for v in discovery.reaching}
    unscaled = [
        s.relu for s in discovery.sites if any(discovery.find_var(u[0]) in reach for u in discovery.site_units[s.conv])
    ]
    while True:
        analysis = _Analysis(model, graph, add_affine, active=active)
        analysis.walk()
        reaching = {analysis.find_var(v) for v in analysis.reaching}
        if not reaching:
            return dataclasses.replace(analysis.topology(), left_unscaled=tuple(dict.fromkeys(unscaled)))
        dropped = {v for v in active if analysis.find_var(v) in reaching}
        unscaled += [s.relu for s in analysis.sites if any(u[0] in dropped for u in analysis.site_units[s.conv])]
        active = active - dropped


_GATES = {torch.sigmoid, F.sigmoid, "sigmoid", F.hardsigmoid}
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_RESHAPES = {"view", "reshape", torch.reshape, "transpose", torch.transpose, "permute", torch.permute, "flatten"}
_RESHAPES |= {torch.flatten, "unsqueeze", torch.unsqueeze, "squeeze", torch.squeeze}
_SPLITS = {"chunk", torch.chunk, "split", torch.split}


class _Analysis:
    """One forward walk over the traced graph, carrying each value's scale state."""

    def __init__(
        self, model: nn.Module, graph: torch.fx.Graph, add_affine: bool, active: frozenset[str] | set[str] | None
    ) -> None:
        self.graph = graph
        self.active = active  # the scale variables kept (None: pass 1, all of them)
        self.modules = dict(model.named_modules())
        self.add_affine = add_affine
        self.state: dict[torch.fx.Node, _State] = {}
        self.sites: list[Site] = []
        self.site_units: dict[str, tuple[Unit, ...]] = {}
        self.sited: set[str] = set()  # pre-activation values an activation has read
        self.compensations: list[tuple[str, tuple[Unit | None, ...], int, int, tuple[str, ...], float]] = []
        self.absorbs: list[tuple[str, tuple[Unit | None, ...]]] = []
        self.origins: dict[str, str] = {}  # variable (module path) -> rows or affine
        self.refusals: list[Refusal] = []
        self.problems: list[tuple[set[str], Refusal]] = []  # refusals if their variables are kept
        self.reaching: set[str] = set()
        self.parent: dict[Unit, Unit] = {}
        self.var_parent: dict[str, str] = {}
        self.calls: dict[str, int] = {}
        self.names: dict[str, str] = {}
        self._block, self._index = 1, 0
        self.not_sites: list[str] = []
        self.affine_added: dict[str, int] = {}
        self.blocked_vars: dict[str, tuple[str, str, str]] = {}  # norm path -> (its label, why, fix)
        self.ordinal = 0
        self.labels = _activation_labels(graph, self.modules)

    # -- union-find over units and variables ---------------------------------------------------------

    def find(self, u: Unit) -> Unit:
        while self.parent.get(u, u) != u:
            self.parent[u] = self.parent.get(self.parent[u], self.parent[u])
            u = self.parent[u]
        return u

    def find_var(self, v: str) -> str:
        while self.var_parent.get(v, v) != v:
            v = self.var_parent[v]
        return v

    def union(self, a: Unit, b: Unit) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        va, vb = self.find_var(a[0]), self.find_var(b[0])
        if va != vb:
            self.var_parent[vb] = va

    def wanted(self) -> set[str]:
        """Pass 1's verdict: the variables joined to a site, less those whose scale reaches the output."""
        with_site = {self.find_var(u[0]) for units in self.site_units.values() for u in units}
        reaching = {self.find_var(v) for v in self.reaching}
        return {v for v in self.origins if self.find_var(v) in with_site and self.find_var(v) not in reaching}

    # -- refusals -----------------------------------------------------------------------------------

    def refuse(self, node: torch.fx.Node, reason: str, fix: str = "") -> None:
        self.refusals.append(Refusal(self._label(node), reason, fix))

    def problem(self, node: torch.fx.Node, x: _State | Sequence[_State], reason: str, fix: str = "") -> None:
        """A refusal if the scales ``x`` carries are kept (pass 2 keeps only those; pass 1 notes it)."""
        states: list[_State] = list(x) if isinstance(x, (list, tuple)) else [x]  # type: ignore[list-item]
        variables = {u[0] for s in states for u in _units(s)}
        if variables:
            self.problems.append((variables, Refusal(self._label(node), reason, fix)))

    def _label(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target} ({type(self.modules[str(node.target)]).__name__})"
        if node.op in ("call_function", "call_method"):
            return f"{node.name} ({_target_name(node.target)})"
        return node.name

    # -- the walk -----------------------------------------------------------------------------------

    def walk(self) -> None:
        for node in self.graph.nodes:
            states = [self.state.get(a) for a in node.all_input_nodes]
            if node.op == "call_module":
                self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1
                self.state[node] = self._module(node, self.modules[str(node.target)], states)
            elif node.op in ("call_function", "call_method"):
                self.state[node] = self._function(node, states)
            elif node.op == "output":
                self.reaching |= {u[0] for s in states for u in _units(s)}
            else:
                self.state[node] = None

    def _fresh(self, var: str, kind: str, channels: int) -> tuple[Unit | None, ...]:
        """A new scale variable for ``var``'s output (None labels when pass 2 does not keep it)."""
        self.origins[var] = kind
        if self.active is not None and var not in self.active:
            return (None,) * channels
        return tuple((var, c) for c in range(channels))

    # -- modules ------------------------------------------------------------------------------------

    def _module(self, node: torch.fx.Node, m: nn.Module, states: list[_State]) -> _State:
        path = str(node.target)
        x = states[0] if states else None
        if isinstance(x, _Tuple) or any(isinstance(s, _Tuple) for s in states[1:]):
            self.problem(node, states, "receives the pieces of a split of scaled channels")
            return None
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return self._weighted(node, path, m, x)
        if isinstance(m, NORMS):
            return self._norm(node, path, m, x)
        if isinstance(m, HOMOGENEOUS):
            if type(m).forward not in (nn.ReLU.forward, nn.LeakyReLU.forward, nn.PReLU.forward):
                self.refuse(node, f"{type(m).__name__} overrides the forward of the activation it subclasses")
                self.ordinal += 1
                return None
            return self._activation(node, type(m).__name__, m, x)
        if isinstance(m, COMMUTING):
            if isinstance(m, _POOLS):
                self._pooled()
            if isinstance(x, _Val) and x.grid is not None:
                self.problem(node, x, "pools channels spread over several dimensions")
                return None
            if isinstance(x, _Val) and not x.pre:
                maximum = isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))
                return x.through(
                    path,
                    _max_factor(node, getattr(m, "kernel_size", None), getattr(m, "stride", None)) if maximum else 1.0,
                )
            return x  # a pre-activation value stays one: max(s x) = s max(x)
        if isinstance(m, nn.Flatten):
            return self._flatten(node, x, path, m.start_dim)
        if isinstance(m, _GATE_MODULES) and _gate(node, x):
            return None  # a gate on a value whose scale was compensated (squeeze-and-excitation)
        if isinstance(m, NOT_HOMOGENEOUS):
            return self._not_homogeneous(node, x)
        if any(isinstance(s, _Val) and s.scaled for s in states):
            self.problem(
                node,
                states,
                f"receives per-channel scaled channels, and vggnorm does not know whether {type(m).__name__} "
                "commutes with a positive per-channel scale",
            )
        elif isinstance(x, _Val) and x.pre and x.producer:
            self.refuse(
                node,
                f"follows {x.producer}: vggnorm does not know whether {type(m).__name__} is positively homogeneous, "
                f"so the filters of {x.producer} cannot be normalized",
            )
        return None

    def _weighted(self, node: torch.fx.Node, path: str, m: nn.Conv2d | nn.Linear, x: _State) -> _State:
        base = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
        if _computed_parameters(m):
            self.refuse(node, *_COMPUTED)
            return None
        if type(m).forward is not base.forward:
            self.refuse(
                node,
                f"{type(m).__name__} overrides {base.__name__}.forward (weight standardization?): its stored weights "
                "are not applied as they are, so rescaling them is not exact",
            )
            return None
        if isinstance(m, nn.Conv2d):
            self._index += 1
            self.names[path] = f"conv{self._block}_{self._index}"
        if isinstance(x, _Val) and x.scaled:
            if x.grid is not None:
                self.problem(node, x, "reads channels spread over several dimensions")
            elif isinstance(m, nn.Conv2d) and x.positions > 1:
                self.problem(node, x, "reads flattened scaled channels")
            elif isinstance(m, nn.Linear) and x.positions == 1 and len(shape_of(node.args[0]) or ()) != 2:
                self.problem(
                    node, x, "is applied over the last dimension of channel-scaled features, not over the channels"
                )
            else:
                groups = m.groups if isinstance(m, nn.Conv2d) else 1
                self.compensations.append((path, x.labels, x.positions, groups, x.via, x.max_factor))
        in_c = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        out_c = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        if isinstance(m, nn.Linear) and len(shape_of(node) or (0, 0)) != 2:
            # features on the last dim of an (N, ..., F) output: not channels vggnorm can scale (no site), but
            # an activation after it that is not homogeneous is refused by name, as after a conv
            return _Val((None,) * out_c, pre=node.name, producer=path, in_channels=in_c)
        return _Val(self._fresh(path, "rows", out_c), pre=node.name, producer=path, in_channels=in_c)

    def _norm(self, node: torch.fx.Node, path: str, m: nn.Module, x: _State) -> _State:
        if _computed_parameters(m):
            self.refuse(node, *_COMPUTED)
            return None
        if _batch_statistics(m):
            self.refuse(
                node,
                "normalizes with the statistics of each batch (track_running_stats=False, or training mode), so "
                "every mean after it depends on the batch size and on which images share a batch",
                "call model.eval() on a model with running statistics, or build the norm with "
                "track_running_stats=True and fill them",
            )
            return None
        if type(m).forward is not _norm_forward(m):
            self.refuse(
                node,
                f"{type(m).__name__} overrides the forward of the normalization it subclasses: vggnorm cannot tell "
                "what its affine parameters act on",
            )
            return None
        affine = getattr(m, "affine", getattr(m, "elementwise_affine", True)) and getattr(m, "weight", None) is not None
        if isinstance(x, _Val) and x.scaled:
            if not isinstance(m, batch_norm_class()) or x.grid is not None or x.positions > 1:
                self.problem(
                    node,
                    x,
                    "receives per-channel scaled channels: a normalization by each input's own statistics is not "
                    "invariant to them (GroupNorm and LayerNorm mix channels; epsilon makes InstanceNorm inexact)",
                )
            elif not affine and not self.add_affine:
                self.problem(
                    node,
                    x,
                    "receives per-channel scaled channels and has no affine parameters to absorb them (affine=False)",
                    f"build it with affine=True (weight 1, bias 0: the same function), or pass --add-affine "
                    f"({ADD_AFFINE_NOTE})",
                )
            else:  # an eval BatchNorm absorbs its input's scales exactly: running mean / s, weight * s
                self.absorbs.append((path, x.labels))
        channels = _norm_channels(m, node)
        if not affine and self.add_affine:
            self.affine_added[path] = channels
        producer = x.producer if isinstance(x, _Val) and x.pre and x.producer and not x.norm else path
        in_c = x.in_channels if isinstance(x, _Val) and producer != path else channels
        value = _Val(
            self._fresh(path, "affine", channels),
            pre=node.name,
            producer=producer,
            norm=path,
            norm_type=type(m).__name__,
            in_channels=in_c,
        )
        # a norm that cannot carry a scale keeps its variable, so that what it joins is the same with or without
        # --add-affine: a site whose scale it would have to carry is refused (``topology``), and a site right
        # after it is refused here with the activation named
        if not self._channelwise(node, m):
            why = "normalizes over more than the channels (its affine parameters are not per channel)"
            self.blocked_vars[path] = (self._label(node), why, "")
            return dataclasses.replace(value, blocked=why)
        if not affine and not self.add_affine:
            why = "has no affine parameters to absorb the scale (affine=False)"
            fix = (
                f"build it with affine=True (weight 1, bias 0: the same function), or pass --add-affine "
                f"({ADD_AFFINE_NOTE})"
            )
            self.blocked_vars[path] = (self._label(node), why, fix)
            return dataclasses.replace(value, blocked=why, fix=fix)
        return dataclasses.replace(value, added_affine=not affine)

    def _channelwise(self, node: torch.fx.Node, m: nn.Module) -> bool:
        """Whether ``m``'s affine parameters act per channel (dim 1) of this input, by the norm's definition
        (its class and the dims it normalizes), never by a coincidence of sizes."""
        if not isinstance(m, nn.LayerNorm):
            return True  # BatchNorm, GroupNorm, InstanceNorm: one weight and bias per channel
        if _is_layernorm2d(m):  # torchvision's: permutes the channels last and normalizes over them alone
            return True
        shape = shape_of(node.args[0])
        # a plain LayerNorm over the features of an (N, features) input: the features are its channels
        return shape is not None and len(shape) == 2 and tuple(m.normalized_shape) == (shape[1],)

    def _activation(self, node: torch.fx.Node, kind: str, m: nn.Module | None, x: _State) -> _State:
        """A call of ReLU, LeakyReLU or PReLU (a module or a function): a site when it reads a
        pre-activation value whose every channel has a scale variable."""
        call, self.ordinal = self.ordinal, self.ordinal + 1
        label = self.labels.get(node, node.name)
        if isinstance(x, _Tuple):
            self.problem(node, x, "activates the pieces of a split of scaled channels")
            return None
        if not isinstance(x, _Val):
            self.not_sites.append(label)
            return None
        if x.pre and x.blocked:
            self.refuse(
                _node_named(self.graph, x.norm) or node,
                f"{x.blocked}, but the activation {label} after {x.producer} is to be normalized",
                x.fix,
            )
            return None
        channels = len(x.labels)
        if isinstance(m, nn.PReLU) and m.num_parameters not in (1, channels):
            self.refuse(node, f"has {m.num_parameters} parameters for {channels} channels")
            return None
        if kind == "PReLU" and m is None and _prelu_weights(node) not in (1, channels, None):
            self.refuse(node, f"has {_prelu_weights(node)} parameters for {channels} channels")
            return None
        site_ok = x.pre and x.pre not in self.sited and x.grid is None and all(u is not None for u in x.labels)
        if x.pre:
            self.sited.add(x.pre)
        if not site_ok:
            if not x.scaled and not x.pre:
                self.not_sites.append(label)
            read = x.read()
            return read.through(label) if read is not None else None
        shape = shape_of(node) or ()
        key = x.producer if x.producer and x.producer not in self.site_units else label
        site = Site(
            key,
            label,
            x.norm if x.producer and x.norm and x.producer != x.norm else None,
            x.in_channels if key == x.producer else channels,
            channels,
            "linear" if len(shape) == 2 or x.positions > 1 else "conv",
            x.norm_type if x.norm else "",
            kind,
            x.added_affine,
            call,
        )
        self.sites.append(site)
        self.site_units[key] = tuple(u for u in x.labels if u is not None)
        return x.read()

    def _not_homogeneous(self, node: torch.fx.Node, x: _State) -> _State:
        what = "is not positively homogeneous (f(s x) != s f(x) for s > 0)"
        if isinstance(x, _Val) and x.scaled:
            self.problem(node, x, f"receives per-channel scaled channels and {what}")
        elif isinstance(x, _Val) and x.pre and x.producer:
            self.refuse(
                node,
                f"{what}: the filters of {x.producer} before it cannot be normalized",
                "vggnorm normalizes ReLU, LeakyReLU and PReLU networks",
            )
        return None

    def _flatten(self, node: torch.fx.Node, x: _State, where: str, start_dim: int = 1) -> _State:
        if not isinstance(x, _Val) or not x.scaled:
            return None if not isinstance(x, _Val) else dataclasses.replace(x, pre="", producer="")
        shape = shape_of(node.args[0])
        out = shape_of(node)
        if x.grid is None and shape is not None and out is not None and start_dim == 1 and len(out) == 2:
            if out[0] == shape[0] and len(shape) == 2:
                return x.through(where)
            if out[0] == shape[0] and out[1] == math.prod(shape[1:]):
                return _Val(x.labels, positions=x.positions * math.prod(shape[2:]), via=(*x.via, where))
        return self._reshaped(node, x, where)

    def _reshaped(self, node: torch.fx.Node, x: _Val, where: str) -> _State:
        """A view, reshape, transpose or permute that moves channels across dims (a channel shuffle): the
        labels are laid out as the value and moved by the same op; back on dim 1 alone, they are channels."""
        shape, out = shape_of(node.args[0]), shape_of(node)
        if shape is None or out is None or x.positions > 1 or len(shape) < 2 or len(out) < 2 or out[0] != shape[0]:
            self.problem(node, x, "reshapes scaled channels in a way vggnorm cannot follow")
            return None
        grid = x.grid
        if grid is None and shape[1] != len(x.labels):
            self.problem(node, x, "reshapes scaled channels in a way vggnorm cannot follow")
            return None
        if grid is None:
            grid = torch.arange(len(x.labels)).view(1, -1, *([1] * (len(shape) - 2))).expand(1, *shape[1:])
        target = node.target
        try:
            if target in ("transpose", torch.transpose):
                grid = grid.transpose(int(node.args[1]), int(node.args[2]))  # type: ignore[arg-type]
            elif target in ("permute", torch.permute):
                dims = (
                    node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
                )
                grid = grid.permute(*[int(d) for d in dims])  # type: ignore[arg-type]
            else:  # view, reshape, flatten, (un)squeeze: the output's shape, as shape propagation found it
                grid = grid.reshape(1, *out[1:])
        except (TypeError, ValueError, RuntimeError, IndexError):
            self.problem(node, x, "reshapes scaled channels in a way vggnorm cannot follow")
            return None
        if grid.dim() >= 2 and grid.shape[1] > 0:
            flat = grid.reshape(grid.shape[0], grid.shape[1], -1)
            first = flat[:, :, :1]
            if bool((flat == first).all()):  # each channel holds one label again: channels
                labels = tuple(x.labels[int(i)] for i in first.flatten().tolist())
                return _Val(labels, via=(*x.via, where), max_factor=x.max_factor)
        return _Val(x.labels, via=(*x.via, where), max_factor=x.max_factor, grid=grid.contiguous())

    def _pooled(self) -> None:
        if self._index:
            self._block, self._index = self._block + 1, 0

    # -- functions and methods ----------------------------------------------------------------------

    def _function(self, node: torch.fx.Node, states: list[_State]) -> _State:
        target = node.target
        x = states[0] if states else None
        if target is operator.getitem:
            return self._getitem(node, x)
        if target in _HOMOGENEOUS_FNS:
            kind = "LeakyReLU" if target is F.leaky_relu else "PReLU" if target in (F.prelu, torch.prelu) else "ReLU"
            return self._activation(node, kind, None, x)
        if isinstance(x, _Tuple) or any(isinstance(s, _Tuple) for s in states):
            self.problem(node, states, "uses the pieces of a split of scaled channels")
            return None
        if target in _GATES and _gate(node, x):
            return None  # a gate on a value whose scale was compensated (squeeze-and-excitation)
        if target in _NOT_HOMOGENEOUS_FNS:
            return self._not_homogeneous(node, x)
        if target in _POOL_FNS:
            self._pooled()
        scaled = [s for s in states if isinstance(s, _Val) and s.scaled]
        if isinstance(x, _Val) and x.grid is not None and target not in _RESHAPES and target not in _COMMUTING_FNS:
            self.problem(node, states, "uses channels spread over several dimensions")
            return None
        if target in _COMMUTING_FNS or (target is F.pad and _zero_or_copy_pad(node)):
            if not isinstance(x, _Val) or x.pre:
                return x
            if target in (F.max_pool2d, torch.max_pool2d, F.adaptive_max_pool2d):
                kernel = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size")
                stride = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
                if target is F.adaptive_max_pool2d:
                    kernel = stride = None
                return x.through(node.name, _max_factor(node, kernel, stride or kernel))
            return x.through(node.name)
        if target in _FLATTEN_FNS or target in _RESHAPES:
            if not isinstance(x, _Val) or not x.scaled:
                return None
            if target in (torch.flatten, "flatten"):
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                return self._flatten(node, x, node.name, start if isinstance(start, int) else -1)
            if target in ("view", "reshape", torch.reshape):
                return self._flatten(node, x, node.name, 1)
            return self._reshaped(node, x, node.name)
        if target in _CAT_FNS:
            return self._cat(node)
        if target in _SPLITS:
            return self._split(node, x)
        if target in ("mean", torch.mean, "amax", torch.amax) and isinstance(x, _Val) and x.positions == 1:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            ndim = len(shape_of(node.args[0]) or ())
            dims = [dims] if isinstance(dims, int) else dims
            if isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) and d % ndim > 1 for d in dims):
                # a mean or max over positions (global pooling) keeps each channel's scale
                if x.pre:
                    return x
                return x.through(node.name, _max_factor(node, None, None, 1) if target in ("amax", torch.amax) else 1.0)
        if target in (getattr, "size", "dim"):
            return None
        if target in (operator.neg, torch.neg, "neg") and isinstance(x, _Val) and x.scaled and x.grid is None:
            return x if x.pre else x.through(node.name)  # -(x / s) = (-x) / s: the constant -1
        if target in _ARITHMETIC and len(node.args) == 2:
            return self._arithmetic(node, target, states)
        if not scaled:
            return None
        self.problem(
            node,
            scaled,
            "receives per-channel scaled channels, and vggnorm does not know whether it commutes with them",
        )
        return None

    def _arithmetic(self, node: torch.fx.Node, target: Any, states: list[_State]) -> _State:
        a, b = node.args
        constants = [c for c in (a, b) if not isinstance(c, torch.fx.Node)]
        values = [self.state.get(c) if isinstance(c, torch.fx.Node) else None for c in (a, b)]
        scaled = [v for v in values if isinstance(v, _Val) and v.scaled]
        pres = [v for v in values if isinstance(v, _Val) and v.pre]
        name = _target_name(target)
        if constants:
            x = next((v for v in values if isinstance(v, _Val)), None)
            if x is None:
                return None
            constant = constants[0]
            if not x.scaled:
                return None  # a pre-activation value plus a constant: no longer one; nothing is scaled
            if not isinstance(constant, (int, float)) or isinstance(constant, bool):
                self.problem(node, x, f"combines per-channel scaled channels with a {type(constant).__name__}")
                return None
            # (c x) / s = c (x / s) for any constant c, of either sign; so is (x / c) / s
            if target in (operator.mul, torch.mul, "mul") or (
                target in (operator.truediv, torch.div, "div") and b is constant and constant != 0
            ):
                return x.through(node.name) if not x.pre else x
            self.problem(
                node,
                x,
                f"applies {name} with the constant {constant!r} to per-channel scaled channels: "
                "(x + c) / s != x / s + c, so the fold cannot keep the function",
            )
            return None
        va, vb = values
        shape = shape_of(node)
        if target in (operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div"):
            # a product with an unscaled tensor keeps the scales, per element: g (x / s) = (g x) / s (a gate)
            divide = target in (operator.truediv, torch.div, "div")
            if len(scaled) == 1 and not (divide and vb is scaled[0]):
                x = scaled[0]
                if x.grid is None and x.positions == 1 and shape is not None and shape == shape_of(a if va is x else b):
                    return dataclasses.replace(x, producer="") if x.pre else x.through(node.name)
            if scaled:
                self.problem(
                    node,
                    scaled,
                    f"applies {name} to per-channel scaled channels and another scaled tensor, or broadcasts them",
                )
            return None
        # add, sub: both sides must carry the same scales; a residual add joins them into one stream
        xa, xb = (v if isinstance(v, _Val) else None for v in (va, vb))
        if xa is None or xb is None or not (xa.scaled or xb.scaled or xa.pre or xb.pre):
            if scaled:
                self.problem(
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
            self.problem(node, scaled, f"{name}s per-channel scaled values of different layouts (broadcasting?)")
            return None
        if any((ua is None) != (ub is None) for ua, ub in zip(xa.labels, xb.labels, strict=True)):
            self.problem(
                node,
                scaled,
                f"{name}s per-channel scaled channels and channels that carry no scale: both sides would need the "
                "same scales",
            )
            return None
        for ua, ub in zip(xa.labels, xb.labels, strict=True):
            if ua is not None and ub is not None:
                self.union(ua, ub)
        pre = node.name if pres or scaled else ""
        return _Val(
            xa.labels,
            pre=pre,
            positions=xa.positions,
            via=(node.name,),
            max_factor=max(xa.max_factor, xb.max_factor),
        )

    def _cat(self, node: torch.fx.Node) -> _State:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = [a for a in tensors if isinstance(a, torch.fx.Node)] if isinstance(tensors, (list, tuple)) else []
        states = [self.state.get(a) for a in parts]
        if not any(isinstance(s, _Val) and s.scaled for s in states):
            return None
        ndim = len(shape_of(node) or ())
        if (
            dim not in (1, 1 - ndim)
            or any(isinstance(s, _Val) and (s.positions > 1 or s.grid is not None) for s in states)
            or any(isinstance(s, _Tuple) for s in states)
        ):
            self.problem(node, states, "concatenates scaled channels along a dimension other than the channels")
            return None
        labels: list[Unit | None] = []
        for a, s in zip(parts, states, strict=True):
            labels += list(s.labels) if isinstance(s, _Val) else [None] * (shape_of(a) or (0, 0))[1]
        factor = max(s.max_factor for s in states if isinstance(s, _Val))
        pre = node.name if all(isinstance(s, _Val) and s.pre for s in states) else ""
        return _Val(tuple(labels), pre=pre, via=(node.name,), max_factor=factor)

    def _split(self, node: torch.fx.Node, x: _State) -> _State:
        """``chunk`` and ``split`` along the channels: each piece keeps its channels' scales."""
        if not isinstance(x, _Val) or not x.scaled:
            return None
        arg = (
            node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
        )
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        n = len(x.labels)
        ndim = len(shape_of(node.args[0]) or ())
        if dim not in (1, 1 - ndim) or x.grid is not None or x.positions > 1:
            self.problem(node, x, "splits scaled channels along a dimension other than the channels")
            return None
        if node.target in ("chunk", torch.chunk) and isinstance(arg, int):
            step = -(-n // arg)
            sizes = [min(step, n - i) for i in range(0, n, step)]
        elif isinstance(arg, int):
            sizes = [min(arg, n - i) for i in range(0, n, arg)]
        elif isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg):
            sizes = list(arg)
        else:
            self.problem(node, x, "splits scaled channels into sizes vggnorm cannot read")
            return None
        items, start = [], 0
        for size in sizes:
            items.append(_Val(x.labels[start : start + size], pre=f"{node.name}.{start}" if x.pre else ""))
            start += size
        return _Tuple(tuple(items))

    def _getitem(self, node: torch.fx.Node, x: _State) -> _State:
        index = node.args[1]
        if isinstance(x, _Tuple):
            return x.items[index] if isinstance(index, int) and -len(x.items) <= index < len(x.items) else None
        if not isinstance(x, _Val) or not x.scaled:
            return None
        # x[:, a:b] (and x[:, a:b, ...]): a slice of the channels
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
            return _Val(labels, pre=f"{node.name}" if x.pre else "", via=(*x.via, node.name), max_factor=x.max_factor)
        self.problem(node, x, "indexes scaled channels in a way vggnorm cannot follow")
        return None

    # -- the result ---------------------------------------------------------------------------------

    def topology(self) -> Topology:
        """Pass 2's result: sites, origins, absorptions, compensations and streams, in terms of the sites'
        scales; the refusals (its problems all concern kept variables)."""
        refusals = list(self.refusals)
        refusals += [r for variables, r in self.problems if self.active is None or variables & set(self.active)]
        for path, (label, why, fix) in self.blocked_vars.items():
            if self.active is not None and path in self.active and not any(r.node == label for r in refusals):
                refusals.append(
                    Refusal(label, f"{why}, but a residual add or a cat joins it to normalized activations", fix)
                )
        for path, n in self.calls.items():
            m = self.modules[path]
            used = (
                path in self.origins
                and self.active is not None
                and path in self.active
                or any(c[0] == path for c in self.compensations)
                or any(a[0] == path for a in self.absorbs)
            )
            if n > 1 and used and not isinstance(m, HOMOGENEOUS):
                refusals.append(
                    Refusal(
                        f"{path} ({type(m).__name__})",
                        f"is called {n} times in forward: one module cannot carry several scales",
                        "give each use its own module",
                    )
                )
        # each class of units shares one scale; a site's channel stands for it (the first site, in order)
        rep: dict[Unit, tuple[str, int]] = {}
        members: dict[Unit, list[tuple[str, int]]] = {}
        for site in self.sites:
            for c, u in enumerate(self.site_units[site.conv]):
                root = self.find(u)
                rep.setdefault(root, (site.conv, c))
                members.setdefault(root, []).append((site.conv, c))

        def runs(labels: tuple[Unit | None, ...]) -> tuple[Run, ...]:
            out: list[list[Any]] = []
            for u in labels:
                r = rep.get(self.find(u)) if u is not None else None
                key, channel = r if r is not None else (None, 0)
                last = out[-1] if out else None
                if last is not None and last[0] == key and (key is None or last[1] + last[2] == channel):
                    last[2] += 1
                else:
                    out.append([key, channel, 1])
            return tuple((k, s, n) for k, s, n in out)

        kept = set(self.active or ())
        origins = tuple(
            Origin(var, kind, runs(tuple((var, c) for c in range(_channels_of(self, var)))))
            for var, kind in self.origins.items()
            if var in kept
        )
        origins = tuple(o for o in origins if any(k is not None for k, _, _ in o.runs))
        compensations = tuple(
            Compensation(path, runs(labels), positions, groups, via, factor)
            for path, labels, positions, groups, via, factor in self.compensations
        )
        absorbs = tuple(Absorb(path, runs(labels)) for path, labels in self.absorbs)
        carrying = {o.module for o in origins} | {a.module for a in absorbs}
        added_affine = tuple((path, n) for path, n in self.affine_added.items() if path in carrying)
        streams = self._streams(members, origins, compensations)
        # Gatys' names (conv1_1, ...) mean something only for a chain of convs (VGG's, AlexNet's): each
        # site compensated by one layer reading it alone; a branching model's would be made up (conv2_18)
        readers: dict[str, int] = {}
        for comp in compensations:
            for p in comp.sites:
                readers[p] = readers.get(p, 0) + 1
        chain = (
            all(len(c.runs) == 1 and c.groups == 1 for c in compensations)
            and all(n == 1 for n in readers.values())
            and not streams
            and not absorbs
            and all(s.conv in self.names for s in self.sites if s.kind == "conv")
        )
        names = self.names if chain and not refusals else {}
        conv_sites = tuple(s for s in self.sites if s.kind == "conv")
        fc_sites = tuple(s for s in self.sites if s.kind == "linear")
        classifier = next((c for c in compensations if c.positions > 1), None)
        return Topology(
            conv_sites,
            classifier=classifier.module if classifier else None,
            classifier_in_features=sum(n for _, _, n in classifier.runs) * classifier.positions if classifier else None,
            fc_sites=fc_sites,
            compensations=compensations,
            refusals=tuple(dict.fromkeys(refusals)),
            names=names,
            not_sites=tuple(dict.fromkeys(self.not_sites)),
            origins=origins,
            absorbs=absorbs,
            streams=streams,
            activation_calls=self.ordinal,
            added_affine=added_affine,
        )

    def _streams(
        self,
        members: dict[Unit, list[tuple[str, int]]],
        origins: tuple[Origin, ...],
        compensations: tuple[Compensation, ...],
    ) -> tuple[Stream, ...]:
        """Sites joined by a class of units that more than one site channel measures."""
        parent: dict[str, str] = {}

        def find(k: str) -> str:
            while parent.get(k, k) != k:
                k = parent[k]
            return k

        shared = [m for m in members.values() if len(m) > 1]
        for m in shared:
            for key, _ in m[1:]:
                a, b = find(m[0][0]), find(key)
                if a != b:
                    parent[b] = a
        groups: dict[str, list[str]] = {}
        for m in shared:
            for key, _ in m:
                group = groups.setdefault(find(key), [])
                if key not in group:
                    group.append(key)
        order = {s.conv: i for i, s in enumerate(self.sites)}
        out = []
        for keys in groups.values():
            keys = sorted(keys, key=order.__getitem__)
            numbers: dict[Unit, int] = {}
            classes = tuple(
                tuple(numbers.setdefault(self.find(u), len(numbers)) for u in self.site_units[k]) for k in keys
            )
            inside = set(keys)
            writers = tuple(o.module for o in origins if any(k in inside for k, _, _ in o.runs))
            readers = tuple(c.module for c in compensations if any(k in inside for k in c.sites))
            out.append(Stream(tuple(keys), classes, writers, readers))
        return tuple(out)


def _gate(node: torch.fx.Node, x: _State) -> bool:
    """A sigmoid that gates: it reads a conv's output whose input scales were compensated (nothing scaled),
    and only multiplies other values (squeeze-and-excitation), so no activation of the model is skipped."""
    products = (operator.mul, torch.mul, "mul")
    return (
        isinstance(x, _Val)
        and bool(x.pre)
        and not x.scaled
        and bool(node.users)
        and all(u.op in ("call_function", "call_method") and u.target in products for u in node.users)
    )


def _channels_of(analysis: _Analysis, var: str) -> int:
    m = analysis.modules[var]
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return _norm_channels(m, _node_named(analysis.graph, var))


def _norm_channels(m: nn.Module, node: torch.fx.Node | None) -> int:
    """A norm's channels: its own count (BatchNorm, InstanceNorm, GroupNorm), else its output's dim 1."""
    return int(getattr(m, "num_features", 0) or getattr(m, "num_channels", 0) or 0) or (
        (shape_of(node) or (0, 0))[1] if node is not None else 0
    )


def _prelu_weights(node: torch.fx.Node) -> int | None:
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    shape = shape_of(w) if isinstance(w, torch.fx.Node) else None
    return math.prod(shape) if shape is not None else None


def _activation_labels(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> dict[torch.fx.Node, str]:
    """A label per activation call: the module's path (``:k`` on its k-th call when it is called several
    times), or the module whose forward calls the function and the function (``conv1.relu``)."""
    bases: dict[torch.fx.Node, str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), HOMOGENEOUS):
            bases[node] = str(node.target)
        elif node.op in ("call_function", "call_method") and node.target in _HOMOGENEOUS_FNS:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            owner = stack[-1][0] if stack else ""
            bases[node] = f"{owner}.{_target_name(node.target)}" if owner else _target_name(node.target)
    total: dict[str, int] = {}
    for base in bases.values():
        total[base] = total.get(base, 0) + 1
    seen: dict[str, int] = {}
    out = {}
    for node, base in bases.items():
        seen[base] = seen.get(base, 0) + 1
        out[node] = base if total[base] == 1 else f"{base}:{seen[base]}"
    return out


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


_COMPUTED = (
    "computes its weights when called (a parametrization such as weight_norm or spectral_norm, or a forward "
    "hook): the stored tensors are not the ones it applies, so rescaling them is not exact",
    "remove it first (torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'), "
    "torch.nn.utils.remove_weight_norm), and normalize the plain module",
)


def _computed_parameters(m: nn.Module) -> bool:
    """Whether ``m``'s parameters are not used as stored: parametrized, or changed by hooks before it runs."""
    return bool(getattr(m, "parametrizations", None) or has_forward_hooks(m))


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


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


def _node_named(graph: torch.fx.Graph, target: str | None) -> torch.fx.Node | None:
    return next((n for n in graph.nodes if n.op == "call_module" and n.target == target), None)


def _zero_or_copy_pad(node: torch.fx.Node) -> bool:
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    return bool(mode != "constant" or not value)


def with_affine(model: nn.Module, topology: Topology) -> nn.Module:
    """``model`` with the norms ``--add-affine`` gave affine parameters (those that carry or absorb a scale
    and have none) given weight 1 and bias 0 (the same function); in place."""
    modules = dict(model.named_modules())
    like = next((t for t in model.parameters() if t.is_floating_point()), torch.empty(0))
    for path, channels in topology.added_affine:
        norm = modules.get(path)
        if norm is not None and getattr(norm, "weight", None) is None:
            norm.weight = nn.Parameter(torch.ones(channels, device=like.device, dtype=like.dtype))
            norm.bias = nn.Parameter(torch.zeros(channels, device=like.device, dtype=like.dtype))
            if hasattr(norm, "affine"):
                norm.affine = True
            else:
                norm.elementwise_affine = True
    return model
