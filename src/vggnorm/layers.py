"""The structural analysis: which units of a model can be normalized, and how the fold compensates.

``find_topology`` traces the model with ``torch.fx`` (its shapes from ``shapes.py``: no memory, no
arithmetic) and follows a per-channel scale through the graph. Every model vggnorm handles,
torchvision's VGGs included, goes through this one analysis.

* A **site** is a Conv2d or Linear whose output reaches a positively homogeneous activation (ReLU,
  LeakyReLU, PReLU: ``f(s x) = s f(x)`` for ``s > 0``) through at most one per-channel affine
  normalization (BatchNorm, GroupNorm, InstanceNorm, a channel-wise LayerNorm) **with** affine
  parameters, and through ops that commute with a positive per-channel scale. Dividing the activation
  by ``s`` is exact by dividing the norm's weight and bias (or the conv's, when there is no norm) by ``s``.
* The scale then **flows** forward through ops that commute with it (pooling, dropout, padding,
  identity, flatten, ``cat`` along channels, the activations themselves) to the next Conv2d or Linear,
  which **compensates** its input columns (per group for a grouped conv; ``P`` columns per channel for
  a Linear after a flatten, channel-major).
* Anything else a scale would reach is **refused**, by node and with the reason: a residual
  add/sub/mul, an activation that is not homogeneous, a norm that receives a scaled input, a norm
  without affine parameters that would have to absorb one, a BatchNorm using batch statistics, a
  module called more than once, weights computed at call time, code the tracer cannot see through.
* **Every reader is accounted for.** The walk runs twice: pass 1 finds the sites; pass 2 walks again
  with each site's value scaled from the node the fold divides (its norm's output, or its conv's), so
  every reader of that value -- a second activation, a side conv, an alias, an in-place ReLU's
  overwritten input, the output -- meets the scale and compensates, passes it on, or is refused. A
  site whose scale reaches the model's output uncompensated is left unscaled (``left_unscaled``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from vggnorm.errors import CheckpointError
from vggnorm.shapes import Tracer, propagate_shapes, shape_of

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
_HOMOGENEOUS_FNS = {F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.prelu, "relu", "relu_"}
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


@dataclass(frozen=True)
class Site:
    """One normalized unit: a Conv2d (or Linear), its optional normalization, and the activation
    whose output is measured and divided by the scales.

    ``conv`` is the producer's module path (``features.0``, or ``classifier.0`` for an fc site);
    ``bn`` is the normalization's path, whatever its kind (``norm``: BatchNorm2d, GroupNorm, ...).
    """

    conv: str
    relu: str
    bn: str | None
    in_channels: int
    out_channels: int
    kind: str = "conv"  # conv or linear
    norm: str = ""  # the normalization's class name
    activation: str = "ReLU"  # the activation's class name
    added_affine: bool = False  # the norm had no affine parameters; --add-affine gave it weight 1, bias 0

    @property
    def signed(self) -> bool:
        """Whether the activation can be negative (LeakyReLU, PReLU): a mean at or below 0 is then legal."""
        return self.activation != "ReLU"


@dataclass(frozen=True)
class Compensation:
    """A Conv2d or Linear that reads scaled channels and multiplies its input columns by their scales.

    ``pieces`` lists its input channels in order: ``(site conv path, channels)``, or ``(None, channels)``
    for channels that carry no scale (a ``cat`` with the image, say). ``positions`` is ``P``, the
    columns per channel of a Linear after a channel-major flatten.
    """

    module: str
    pieces: tuple[tuple[str | None, int], ...]
    positions: int = 1
    groups: int = 1
    via: tuple[str, ...] = ()  # the ops the scale passed through on its way here
    max_factor: float = 1.0  # max poolings on the way raise an input channel's mean at most this many times

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.pieces if p is not None)


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
    """The sites in forward order, the compensations, and the refusals (empty: normalizable)."""

    sites: tuple[Site, ...]
    classifier: str | None = None  # the first Linear after a flatten of scaled channels (fc6)
    classifier_in_features: int | None = None
    fc_sites: tuple[Site, ...] = ()  # Linear -> activation sites (fc6, fc7): normalized on request
    compensations: tuple[Compensation, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    names: dict[str, str] = field(default_factory=dict)  # conv path -> Gatys' name (conv1_1)
    # activations that would be sites, left unscaled because their scale reaches the model's output
    # with no layer after it to compensate (SqueezeNet's last ReLU): the outputs stay unchanged
    left_unscaled: tuple[str, ...] = ()
    # activation modules that are no site: their input is no conv or Linear output (a residual sum, the image)
    not_sites: tuple[str, ...] = ()

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

    def check(self) -> None:
        """Raise ``CheckpointError`` naming the refusals (at most three) when there are any."""
        if self.refusals:
            shown = "; ".join(str(r) for r in self.refusals[:3])
            more = f" (and {len(self.refusals) - 3} more)" if len(self.refusals) > 3 else ""
            raise CheckpointError(f"cannot normalize this model: {shown}{more}. `vggnorm inspect` lists every site")
        if not self.sites:
            raise CheckpointError("the model has no Conv2d -> activation sites to normalize")


# ---- the scale state of one value in the graph ---------------------------------------------------


@dataclass(frozen=True)
class _Pre:
    """The output of a Conv2d/Linear, perhaps through a norm: unscaled, but a site if it meets an activation."""

    producer: str
    kind: str  # conv or linear
    in_channels: int
    channels: int
    origin: str = ""  # the graph node whose value the fold divides: the norm's when there is one, else the producer's
    norm: str | None = None
    norm_type: str = ""
    added_affine: bool = False
    blocked: str = ""  # why it cannot be a site (a norm without affine parameters)
    fix: str = ""


@dataclass(frozen=True)
class _Scaled:
    """Channels divided by the scales of ``pieces``; ``positions > 1`` after a channel-major flatten."""

    pieces: tuple[tuple[str | None, int], ...]
    positions: int = 1
    via: tuple[str, ...] = ()
    max_factor: float = 1.0  # max poolings on the way raise a channel's mean at most this many times

    def through(self, name: str, max_factor: float = 1.0) -> _Scaled:
        return _Scaled(self.pieces, self.positions, (*self.via, name), self.max_factor * max_factor)


_State = _Pre | _Scaled | None  # None: carries no scale


def find_topology(model: nn.Module, *, add_affine: bool = False) -> Topology:
    """Trace ``model`` and return its sites, compensations and refusals (see the module docstring).

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
    # Pass 1 finds the candidate sites. Pass 2 walks again with each site's value scaled from the node
    # the fold divides (not from its activation), so every reader of it -- a second activation, a side
    # conv, an alias, the output -- meets the scale and is compensated or refused. A site whose scale
    # reaches the model's output uncompensated is left unscaled (the outputs stay unchanged), and pass 2
    # runs again without it.
    candidates = _Analysis(model, graph, add_affine).run_candidates()
    unscaled: list[str] = []
    while True:
        topo, reaching_output = _Analysis(model, graph, add_affine, chosen=candidates).run()
        if not reaching_output:
            return dataclasses.replace(topo, left_unscaled=tuple(unscaled))
        unscaled += [s.relu for s in candidates.values() if s.conv in reaching_output]
        candidates = {k: s for k, s in candidates.items() if s.conv not in reaching_output}


class _Analysis:
    """One forward walk over the traced graph, carrying each value's scale state."""

    def __init__(
        self, model: nn.Module, graph: torch.fx.Graph, add_affine: bool, chosen: dict[str, Site] | None = None
    ) -> None:
        self.graph = graph
        # pass 2: the sites, keyed by the node whose value the fold divides (pass 1: None, collecting them)
        self.chosen = chosen
        self.origins: dict[str, Site] = {}
        self.modules = dict(model.named_modules())
        self.add_affine = add_affine
        self.state: dict[torch.fx.Node, _State] = {}
        self.sites: list[Site] = []
        self.compensations: list[Compensation] = []
        self.refusals: list[Refusal] = []
        self.calls: dict[str, int] = {}
        self.names: dict[str, str] = {}
        self._block, self._index = 1, 0
        self.not_sites: list[str] = []

    def refuse(self, node: torch.fx.Node, reason: str, fix: str = "") -> None:
        self.refusals.append(Refusal(self._label(node), reason, fix))

    def _label(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target} ({type(self.modules[str(node.target)]).__name__})"
        if node.op in ("call_function", "call_method"):
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            return f"{node.name} ({target})"
        return node.name

    def run_candidates(self) -> dict[str, Site]:
        """Pass 1: the sites, keyed by the node whose value the fold divides."""
        self._walk()
        return dict(self.origins)

    def _walk(self) -> set[str]:
        """One forward walk; returns the sites whose scale reaches the output."""
        reaching: set[str] = set()
        for node in self.graph.nodes:
            inputs = [a for a in node.all_input_nodes]
            states = [self.state.get(a) for a in inputs]
            if node.op == "call_module":
                self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1
                self.state[node] = self._module(node, self.modules[str(node.target)], states)
            elif node.op in ("call_function", "call_method"):
                self.state[node] = self._function(node, states)
            elif node.op == "output":
                reaching = {p for s in states if isinstance(s, _Scaled) for p, _ in s.pieces if p is not None}
            else:
                self.state[node] = None
            if self.chosen is not None and node.name in self.chosen:
                site = self.chosen[node.name]  # from here on the value is divided by the site's scales
                self.state[node] = _Scaled(((site.conv, site.out_channels),))
        return reaching

    def run(self) -> tuple[Topology, set[str]]:
        """Pass 2: the topology with the chosen sites, and the sites whose scale reaches the output."""
        assert self.chosen is not None
        self.sites = list(self.chosen.values())
        reaching = self._walk()
        for path, n in self.calls.items():
            m = self.modules[path]
            used = any(path in (s.conv, s.relu, s.bn) for s in self.sites) or any(
                c.module == path for c in self.compensations
            )
            if n > 1 and used:
                self.refusals.append(
                    Refusal(
                        f"{path} ({type(m).__name__})",
                        f"is called {n} times in forward: one module cannot carry several scales",
                        "give each use its own module",
                    )
                )
        # Gatys' names (conv1_1, ...) mean something only for a chain of convs (VGG's, AlexNet's): each
        # site compensated by one layer reading it alone; a branching model's would be made up (conv2_18)
        readers: dict[str, int] = {}
        for c in self.compensations:
            for p in c.sites:
                readers[p] = readers.get(p, 0) + 1
        chain = all(len(c.pieces) == 1 and c.groups == 1 for c in self.compensations) and all(
            n == 1 for n in readers.values()
        )
        if not chain or self.refusals:  # (a refused model's compensations are not all known)
            self.names = {}
        conv_sites = tuple(s for s in self.sites if s.kind == "conv")
        fc_sites = tuple(s for s in self.sites if s.kind == "linear")
        classifier = next((c for c in self.compensations if c.positions > 1), None)
        topo = Topology(
            conv_sites,
            classifier=classifier.module if classifier else None,
            classifier_in_features=sum(n for _, n in classifier.pieces) * classifier.positions if classifier else None,
            fc_sites=fc_sites,
            compensations=tuple(self.compensations),
            refusals=tuple(self.refusals),
            names=self.names,
            not_sites=tuple(dict.fromkeys(self.not_sites)),
        )
        return topo, reaching

    # -- modules ----------------------------------------------------------------------------------

    def _module(self, node: torch.fx.Node, m: nn.Module, states: list[_State]) -> _State:
        path = str(node.target)
        x = states[0] if states else None
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return self._weighted(node, path, m, x)
        if isinstance(m, NORMS):
            return self._norm(node, path, m, x)
        if isinstance(m, HOMOGENEOUS):
            if type(m).forward not in (nn.ReLU.forward, nn.LeakyReLU.forward, nn.PReLU.forward):
                self.refuse(node, f"{type(m).__name__} overrides the forward of the activation it subclasses")
                return None
            if isinstance(x, _Pre):
                return self._site(node, path, m, x)
            if isinstance(x, _Scaled):
                if self.chosen is not None and any(s.relu == path for s in self.sites):
                    return _Scaled(x.pieces, x.positions)  # the site's own activation: its scale starts here
                return x.through(path)
            self.not_sites.append(path)
            return None
        if isinstance(m, COMMUTING):
            if isinstance(m, _POOLS):
                self._pooled()
            if isinstance(x, _Scaled):
                maximum = isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))
                return x.through(
                    path,
                    _max_factor(node, getattr(m, "kernel_size", None), getattr(m, "stride", None)) if maximum else 1.0,
                )
            return x  # a pre-activation value stays one: max(s x) = s max(x)
        if isinstance(m, nn.Flatten):
            return self._flatten(node, x, path, m.start_dim)
        if isinstance(m, NOT_HOMOGENEOUS):
            return self._not_homogeneous(node, x)
        if isinstance(x, _Scaled) or any(isinstance(s, _Scaled) for s in states):
            self.refuse(
                node,
                f"receives per-channel scaled channels, and vggnorm does not know whether {type(m).__name__} "
                "commutes with a positive per-channel scale",
            )
        elif isinstance(x, _Pre) and x.kind == "conv":
            self.refuse(
                node,
                f"follows {x.producer}: vggnorm does not know whether {type(m).__name__} is positively homogeneous, "
                "so that conv's filters cannot be normalized",
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
        if isinstance(x, _Scaled):
            if isinstance(m, nn.Conv2d) and x.positions > 1:
                self.refuse(node, "reads flattened scaled channels")
            elif isinstance(m, nn.Linear) and x.positions == 1 and len(shape_of(node.args[0]) or ()) != 2:
                self.refuse(
                    node, "is applied over the last dimension of channel-scaled features, not over the channels"
                )
            else:
                groups = m.groups if isinstance(m, nn.Conv2d) else 1
                self.compensations.append(Compensation(path, x.pieces, x.positions, groups, x.via, x.max_factor))
        kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        in_c = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        out_c = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        return _Pre(path, kind, in_c, out_c, origin=node.name)

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
        if isinstance(x, _Scaled):
            self.refuse(
                node,
                "receives per-channel scaled channels: a normalization is not invariant to them (GroupNorm and "
                "LayerNorm mix channels; epsilon makes even BatchNorm and InstanceNorm inexact)",
            )
            return None
        if not isinstance(x, _Pre):
            return None
        # the norm, not the conv, now carries a scale (a norm before it undoes the conv's)
        normed = dataclasses.replace(
            x, origin=node.name, norm=path, norm_type=type(m).__name__, added_affine=False, blocked="", fix=""
        )
        if not self._channelwise(node, m):
            why = "normalizes over more than the channels (its affine parameters are not per channel)"
            return dataclasses.replace(normed, blocked=why)
        affine = getattr(m, "affine", getattr(m, "elementwise_affine", True)) and getattr(m, "weight", None) is not None
        if not affine and not self.add_affine:
            return dataclasses.replace(
                normed,
                blocked="has no affine parameters to absorb the scale (affine=False)",
                fix=f"build it with affine=True (weight 1, bias 0: the same function), or pass --add-affine "
                f"({ADD_AFFINE_NOTE})",
            )
        return dataclasses.replace(normed, added_affine=not affine)

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

    def _site(self, node: torch.fx.Node, path: str, m: nn.Module, x: _Pre) -> _State:
        if x.blocked:
            self.refuse(
                _node_named(self.graph, x.norm) or node,
                f"{x.blocked}, but the activation {path} after {x.producer} is to be normalized",
                x.fix,
            )
            return None
        if isinstance(m, nn.PReLU) and m.num_parameters not in (1, x.channels):
            self.refuse(node, f"has {m.num_parameters} parameters for {x.channels} channels")
            return None
        if self.chosen is not None:  # pass 2: a site left unscaled (its scale would reach the output)
            return None
        if any(s.conv == x.producer for s in self.origins.values()):
            # a second activation of the same value (or of its producer through a norm): in pass 2 it reads
            # the first one's scaled value, and passes the scale on or is refused there
            return None
        site = Site(x.producer, path, x.norm, x.in_channels, x.channels, x.kind, x.norm_type, type(m).__name__)
        if x.added_affine:
            site = dataclasses.replace(site, added_affine=True)
        self.sites.append(site)
        self.origins[x.origin] = site
        return _Scaled(((x.producer, x.channels),))

    def _not_homogeneous(self, node: torch.fx.Node, x: _State) -> _State:
        what = "is not positively homogeneous (f(s x) != s f(x) for s > 0)"
        if isinstance(x, _Scaled):
            self.refuse(node, f"receives per-channel scaled channels and {what}")
        elif isinstance(x, _Pre) and x.kind == "conv":
            self.refuse(
                node,
                f"{what}: the filters of {x.producer} before it cannot be normalized",
                "vggnorm normalizes ReLU, LeakyReLU and PReLU networks",
            )
        return None

    def _flatten(self, node: torch.fx.Node, x: _State, where: str, start_dim: int = 1) -> _State:
        if not isinstance(x, _Scaled):
            return None
        shape = shape_of(node.args[0])
        out = shape_of(node)
        if shape is None or out is None or start_dim != 1 or len(out) != 2 or out[0] != shape[0]:
            self.refuse(node, "reshapes scaled channels in a way other than a channel-major flatten (N, C*H*W)")
            return None
        if len(shape) == 2:
            return x.through(where)
        return _Scaled(x.pieces, x.positions * math.prod(shape[2:]), (*x.via, where))

    def _pooled(self) -> None:
        if self._index:
            self._block, self._index = self._block + 1, 0

    # -- functions and methods --------------------------------------------------------------------

    def _function(self, node: torch.fx.Node, states: list[_State]) -> _State:
        target = node.target
        x = states[0] if states else None
        scaled = [s for s in states if isinstance(s, _Scaled)]
        if target in _HOMOGENEOUS_FNS:
            if isinstance(x, _Pre) and not x.blocked:
                self.refuse(
                    node,
                    f"activates {x.producer} by a function call, which vggnorm cannot hook to measure",
                    "use an nn.ReLU (or LeakyReLU, PReLU) module",
                )
                return None
            return x.through(node.name) if isinstance(x, _Scaled) else None
        if target in _NOT_HOMOGENEOUS_FNS:
            return self._not_homogeneous(node, x)
        if target in _POOL_FNS:
            self._pooled()
        if target in _COMMUTING_FNS or (target is F.pad and _zero_or_copy_pad(node)):
            if not isinstance(x, _Scaled):
                return x
            if target in (F.max_pool2d, torch.max_pool2d, F.adaptive_max_pool2d):
                kernel = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size")
                stride = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
                if target is F.adaptive_max_pool2d:
                    kernel = stride = None
                return x.through(node.name, _max_factor(node, kernel, stride or kernel))
            return x.through(node.name)
        if target in _FLATTEN_FNS:
            start: Any = 1  # view / reshape: _flatten checks the shapes are (N, ...) -> (N, C*H*W)
            if target in (torch.flatten, "flatten"):
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self._flatten(node, x, node.name, start if isinstance(start, int) else -1)
        if target in _CAT_FNS:
            return self._cat(node)
        if target in ("mean", torch.mean, "amax", torch.amax) and isinstance(x, _Scaled) and x.positions == 1:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            ndim = len(shape_of(node.args[0]) or ())
            dims = [dims] if isinstance(dims, int) else dims
            if isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) and d % ndim > 1 for d in dims):
                # a mean or max over positions (global pooling) keeps each channel's scale
                return x.through(node.name, _max_factor(node, None, None, 1) if target in ("amax", torch.amax) else 1.0)
        if target in (getattr, "size", "dim") or not scaled:
            return None
        constants = [a for a in node.args if not isinstance(a, torch.fx.Node)]
        if target in _ARITHMETIC and len(node.args) == 2 and len(constants) == 1:
            constant = constants[0]
            if not isinstance(constant, (int, float)) or isinstance(constant, bool):
                self.refuse(node, f"combines per-channel scaled channels with a {type(constant).__name__}")
                return None
            # (c x) / s = c (x / s) for any constant c, of either sign; so is (x / c) / s
            if target in (operator.mul, torch.mul, "mul") or (
                target in (operator.truediv, torch.div, "div") and node.args[1] is constant and constant != 0
            ):
                return x.through(node.name) if isinstance(x, _Scaled) else None
            self.refuse(
                node,
                f"applies {_target_name(target)} with the constant {constant!r} to per-channel scaled channels: "
                "(x + c) / s != x / s + c, so the fold cannot keep the function",
            )
            return None
        if target in _ARITHMETIC:
            self.refuse(
                node,
                "combines per-channel scaled channels with another tensor (a residual connection?): both sides "
                "would need the same scales",
                "an activation whose output reaches a residual add (the identity path) cannot be normalized",
            )
            return None
        self.refuse(
            node, "receives per-channel scaled channels, and vggnorm does not know whether it commutes with them"
        )
        return None

    def _cat(self, node: torch.fx.Node) -> _State:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = [a for a in tensors if isinstance(a, torch.fx.Node)] if isinstance(tensors, (list, tuple)) else []
        states = [self.state.get(a) for a in parts]
        if not any(isinstance(s, _Scaled) for s in states):
            return None
        ndim = len(shape_of(node) or ())
        if dim not in (1, 1 - ndim) or any(isinstance(s, _Scaled) and s.positions > 1 for s in states):
            self.refuse(node, "concatenates scaled channels along a dimension other than the channels")
            return None
        pieces: list[tuple[str | None, int]] = []
        for a, s in zip(parts, states, strict=True):
            pieces += list(s.pieces) if isinstance(s, _Scaled) else [(None, (shape_of(a) or (0, 0))[1])]
        factor = max(s.max_factor for s in states if isinstance(s, _Scaled))
        return _Scaled(tuple(pieces), 1, (node.name,), factor)


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
    return bool(getattr(m, "parametrizations", None) or m._forward_pre_hooks or m._forward_hooks)


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _batch_statistics(m: nn.Module) -> bool:
    """Whether a BatchNorm normalizes with each batch's own statistics (InstanceNorm's per-image ones are fine)."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm):
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
    for base in (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm):
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
    """``model`` with the norms of ``--add-affine`` sites given affine parameters, weight 1 and bias 0
    (the same function); in place."""
    modules = dict(model.named_modules())
    like = next((t for t in model.parameters() if t.is_floating_point()), torch.empty(0))
    for site in topology.all_sites:
        norm = modules.get(site.bn) if site.bn else None
        if site.added_affine and norm is not None and getattr(norm, "weight", None) is None:
            channels = site.out_channels
            norm.weight = nn.Parameter(torch.ones(channels, device=like.device, dtype=like.dtype))
            norm.bias = nn.Parameter(torch.zeros(channels, device=like.device, dtype=like.dtype))
            if hasattr(norm, "affine"):
                norm.affine = True
            else:
                norm.elementwise_affine = True
    return model
