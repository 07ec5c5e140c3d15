"""Models by name: build one, read its sites, check or infer a state_dict's arch.

An arch is a torchvision VGG name (``vgg19``) or a user model (``path/to/file.py:NAME`` or
``package.module:NAME``), which exists only after ``import_user_model`` was called for it: importing
runs the user's code, so it is done only when asked for (``--model``), never because a statistics
file names one. The structure of an arch is read off a model built on the ``meta`` device (no
memory, no init), so nothing here hard-codes layer indices.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vggnorm.analysis.handlers import NORMS
from vggnorm.analysis.shapes import input_fits
from vggnorm.analysis.topology import Topology, find_topology, with_affine
from vggnorm.defaults import NAMED_ARCHS, VGG_ARCHS, torchvision_classifiers
from vggnorm.errors import CheckpointError, InputError, UsageError, VggnormError
from vggnorm.io.checkpoint import describe_not_floating, not_floating, protect_input, upcast_half
from vggnorm.options import Padding, Pooling, parse

# user models imported on request: identity (``user_model_key``) -> class or zero-argument factory
_USER_MODELS: dict[str, Callable[[], nn.Module]] = {}


def is_user_model(arch: str) -> bool:
    return ":" in arch


def user_model_key(spec: str) -> str:
    """A user model's identity, the arch it is recorded and looked up as: ``FILE.py:NAME`` with FILE
    resolved (absolute, links followed), so ``m.py:Net``, ``./m.py:Net``, an absolute path or the same
    file from another working directory are one model; ``package.module:NAME`` as given."""
    where, sep, name = spec.rpartition(":")
    if sep and where.endswith(".py"):
        return f"{Path(where).resolve()}:{name}"
    return spec


def canonical_arch(arch: str) -> str:
    """``arch`` as recorded and looked up: a user model's ``user_model_key``, where it names an imported
    model. A relative ``FILE.py:NAME`` recorded elsewhere (before identities were resolved) is the
    imported model whose resolved path ends with FILE, when exactly one does."""
    if not is_user_model(arch):
        return arch
    key = user_model_key(arch)
    if key in _USER_MODELS:
        return key
    where, _, name = arch.rpartition(":")
    rel = Path(where)
    if where.endswith(".py") and not rel.is_absolute():
        parts = tuple(p for p in rel.parts if p != ".")
        if ".." not in parts:
            same = [
                k
                for k in _USER_MODELS
                if k.endswith(f":{name}") and Path(k.rpartition(":")[0]).parts[-len(parts) :] == parts
            ]
            if len(same) == 1:
                return same[0]
    return key


def import_user_model(spec: str) -> str:
    """Import ``path/to/file.py:NAME`` or ``package.module:NAME`` (this runs that code) and make it an
    arch that ``build_model`` builds by calling ``NAME()``. Returns its identity (``user_model_key``):
    every spelling of one file gives the same arch."""
    key = user_model_key(spec)
    if key in _USER_MODELS:
        return key
    where, sep, name = spec.rpartition(":")
    if not (sep and where and name.isidentifier()):
        raise UsageError(f"--model {spec!r}: expected path/to/file.py:NAME or package.module:NAME")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise UsageError(f"--model {spec}: {path} does not exist")
            module_name = f"vggnorm_user_{path.stem}_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(module_name, path.resolve())
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except VggnormError:
        raise
    except Exception as e:  # the user's code may raise anything while importing
        raise InputError(f"--model {spec}: importing {where} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"--model {spec}: {where} has no class or function {name}")
    source = getattr(module, "__file__", None)
    if source:  # the model's code is an input of the command: no output may be written over it
        protect_input(source)
    _USER_MODELS[key] = factory
    return key


def known_archs() -> tuple[str, ...]:
    """The archs a state_dict's arch is inferred among: the user models imported so far (asked for
    explicitly), then torchvision's VGGs and AlexNet. Other torchvision classification models are
    accepted by name (``--arch``), not inferred."""
    return (*_USER_MODELS, *NAMED_ARCHS)


@functools.cache
def _torchvision_classifiers() -> frozenset[str]:
    return frozenset(torchvision_classifiers())


# torchvision's VGG configurations (``torchvision.models.vgg.cfgs``): conv widths, "M" a max pooling
_VGG_CFGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


def feature_kinds(arch: str) -> list[str]:
    """What each of a plain VGG's ``features`` modules is, by index: ``conv``, ``relu`` or ``pool``
    (MatConvNet's and Caffe's VGGs list their layers in this same order)."""
    kinds: list[str] = []
    for v in _VGG_CFGS[arch]:
        kinds += ["pool"] if v == "M" else ["conv", "relu"]
    return kinds


class VGG(nn.Module):
    """torchvision's VGG, module for module (the same paths, modules, state_dict keys and shapes, and
    forward), built without importing torchvision, which costs 1.7 s of every process (verify in CI pays
    it for nothing). Used for structure, for carrying loaded weights, for ``random:SEED``
    (``io.weights._vgg_init`` draws torchvision's initialization over it) and for apply's ``loads`` check.
    ``tests/test_models.py`` holds the two equal."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, bn = 3, arch.endswith("_bn")
        for v in _VGG_CFGS[arch.removesuffix("_bn")]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), *([nn.BatchNorm2d(v)] if bn else [])]
                layers.append(nn.ReLU(inplace=True))
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 1000),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        out: torch.Tensor = self.classifier(x)
        return out


def check_arch(arch: str) -> None:
    if canonical_arch(arch) in known_archs() or arch in _torchvision_classifiers():
        return
    if is_user_model(arch):
        raise UsageError(
            f"{arch} is a user model: pass --model {arch} to import it (this runs its code; vggnorm never "
            "imports code because a file names it)"
        )
    raise UsageError(
        f"unknown architecture {arch!r}; expected one of {', '.join(NAMED_ARCHS)}, another torchvision "
        "classification model (`vggnorm inspect NAME` says whether it can be normalized), or --model"
    )


def build_model(arch: str, *, device: str | torch.device | None = None) -> nn.Module:
    """``arch`` with its own random initialization (``device="meta"``: structure only; a VGG is then
    vggnorm's ``VGG``, which needs no torchvision import). A model whose constructor needs real tensors
    (torchvision's RegNets) is built on the CPU instead of ``meta``."""
    check_arch(arch)
    try:
        return _build(arch, device or "cpu")
    except VggnormError:
        raise
    except Exception as e:  # the constructor (torchvision's or the user's) may raise anything
        if str(device) == "meta":
            try:
                return _build(arch, "cpu")
            except Exception:
                pass
        raise InputError(f"building {arch} failed: {type(e).__name__}: {e}") from e


def _build(arch: str, device: str | torch.device) -> nn.Module:
    with torch.device(device):
        if (key := canonical_arch(arch)) in _USER_MODELS:
            model = _USER_MODELS[key]()
            if not isinstance(model, nn.Module):
                raise InputError(f"--model {arch}: calling it gave a {type(model).__name__}, not an nn.Module")
            return model
        if arch in VGG_ARCHS and str(device) == "meta":
            return VGG(arch)
        import torchvision

        built: nn.Module = torchvision.models.get_model(arch, weights=None)
        return built


def topology(arch: str, add_affine: bool = False) -> Topology:
    """The sites, compensations and refusals of ``arch`` (``analysis.topology.find_topology`` on a model built
    on the meta device), refusals included: ``inspect`` lists them. Analysed once per process, however the
    arguments are spelled (``topology(a)``, ``topology(a, False)``)."""
    return _topology(arch, bool(add_affine))


@functools.cache
def _topology(arch: str, add_affine: bool) -> Topology:
    model = build_model(arch, device="meta").eval()
    if add_affine and not any(_without_affine(m) for m in model.modules()):
        return _topology(arch, False)  # --add-affine changes nothing here: the same analysis, once
    return find_topology(model, add_affine=add_affine)


def _without_affine(m: nn.Module) -> bool:
    """A norm whose affine parameters --add-affine would add."""
    return isinstance(m, NORMS) and getattr(m, "weight", None) is None


def checked_topology(arch: str, add_affine: bool = False) -> Topology:
    """``topology(arch)``, raising ``CheckpointError`` with the reasons when it cannot be normalized."""
    topo = topology(arch, add_affine)
    topo.check()
    return topo


@functools.cache
def _shapes(arch: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_model(arch, device="meta").state_dict().items()}


@functools.cache
def affine_keys(arch: str) -> dict[str, tuple[int, ...]]:
    """The weight and bias ``--add-affine`` gives the norms of ``arch`` that have none: a state_dict
    may hold them (a normalized one does) or not (the original)."""
    topo = topology(arch, True)
    return {f"{path}.{p}": (channels,) for path, channels in topo.added_affine for p in ("weight", "bias")}


def is_features_only(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return all(k.startswith("features.") for k in state_dict)


def conv_names(arch: str) -> dict[str, str]:
    """Gatys' names (conv1_1 ...) of ``arch``'s convs, keyed by module path."""
    return topology(arch).names


def bn_eps(arch: str) -> dict[str, tuple[str, float]]:
    """For a ``_bn`` arch: conv path -> (its BatchNorm's path, the BatchNorm's eps)."""
    modules = dict(build_model(arch, device="meta").named_modules())
    return {s.conv: (s.bn, float(modules[s.bn].eps)) for s in topology(arch).sites if s.bn is not None}


def infer_arch(state_dict: Mapping[str, torch.Tensor], *, prefer: str | None = None) -> str:
    """The arch whose keys and shapes ``state_dict`` has (features-only state_dicts too): ``prefer``
    (any arch: a torchvision model named with --arch) if it fits (two models may share their shapes),
    else the first of ``known_archs()`` that does."""
    all_shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    features_only = is_features_only(state_dict)
    for arch in dict.fromkeys([*([prefer] if prefer is not None else []), *known_archs()]):
        expected = _without_missing_counters(_shapes(arch), state_dict)
        if features_only:
            expected = {k: v for k, v in expected.items() if k.startswith("features.")}
        if all_shapes == expected:
            return arch
        extra = set(all_shapes) - set(expected)
        if extra and expected.items() <= all_shapes.items():  # perhaps the weights --add-affine gave norms
            optional = affine_keys(arch)  # (an analysis: only for a near match)
            if all(optional.get(k) == all_shapes[k] for k in extra):
                return arch
    convs = sum(1 for k, v in state_dict.items() if k.endswith(".weight") and v.ndim == 4)
    has_bn = any(k.endswith("running_mean") for k in state_dict)
    raise CheckpointError(
        f"the state_dict matches no torchvision VGG or AlexNet ({convs} conv weights, "
        f"{'with' if has_bn else 'without'} BatchNorm, {len(state_dict)} tensors), and only those are recognized "
        "by their keys: give the statistics it was normalized with (--stats), or name the model (--arch NAME where "
        "the command has it; else --model torchvision.models:NAME, or --model FILE.py:NAME for your own)"
    )


# BatchNorm's counter of training batches: torch's load_state_dict fills it in when a checkpoint lacks it
COUNTER = "num_batches_tracked"


def _without_missing_counters(
    expected: dict[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor]
) -> dict[str, tuple[int, ...]]:
    """``expected`` without the BatchNorm counters ``state_dict`` lacks (``torch`` loads such a checkpoint)."""
    return {k: v for k, v in expected.items() if k in state_dict or not k.endswith(COUNTER)}


def check_state_dict(state_dict: Mapping[str, torch.Tensor], arch: str, *, features_only: bool = False) -> None:
    """Raise ``CheckpointError`` listing missing, unexpected and mis-shaped keys (sorted)."""
    expected = _shapes(arch)
    # --add-affine's norm parameters, when present (an analysis: only when there are keys to explain)
    optional = (
        {k: v for k, v in affine_keys(arch).items() if k in state_dict} if set(state_dict) - set(expected) else {}
    )
    expected = _without_missing_counters({**expected, **optional}, state_dict)
    if features_only:
        expected = {k: v for k, v in expected.items() if k.startswith("features.")}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    dtypes = [k for k in not_floating(state_dict) if k in expected]  # in the state_dict's (forward) order
    if missing or unexpected or shapes or dtypes:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if shapes:
            parts.append(
                "wrong shapes: " + ", ".join(f"{k} {tuple(state_dict[k].shape)} != {expected[k]}" for k in shapes)
            )
        if dtypes:
            parts.append(describe_not_floating(state_dict, dtypes))
        raise CheckpointError(f"the state_dict does not fit {arch}: " + "; ".join(parts))


@functools.cache
def min_input_size(arch: str) -> int:
    """The smallest square input ``arch`` can take (its poolings must leave at least one position),
    found by running it on the meta device (no memory, no arithmetic)."""
    fits = input_fits(build_model(arch, device="meta").eval())

    low, high = 0, 1  # low does not fit, high does
    while not fits(high):
        low, high = high, high * 2
        if high > 4096:
            return high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


# A probe for the checks (a) and (b): their identities hold for every input, so a small one checks them as
# well as a full-size one, at a fraction of the float64 arithmetic.
PROBE_SIZE = 32


@functools.cache
def probe_size(arch: str, crop: int) -> int:
    """``PROBE_SIZE`` (or the arch's smallest input, if larger, and at most ``crop``) when ``arch`` takes it;
    else ``crop``, the size it was measured at (a model whose Linear fixes its input size)."""
    fits = input_fits(build_model(arch, device="meta").eval())
    size = min(PROBE_SIZE, crop)
    if fits(size):  # then the smallest input is no larger (a larger input fits where a smaller one does)
        return size
    size = max(size, min_input_size(arch))
    return size if fits(size) else crop


def check_input_size(arch: str, crop: int) -> None:
    """Refuse, before any work, a crop the arch cannot take, saying the smallest it can."""
    smallest = min_input_size(arch)
    if crop < smallest:
        raise UsageError(
            f"--crop {crop} is too small for {arch}: its pooling layers need inputs of at least {smallest}x{smallest}; "
            f"use --crop {smallest} or more (and --resize at least as large)"
        )


@dataclass(frozen=True)
class ForwardPolicy:
    """How the model is run when it is measured: the surgery a measurement policy asked for by name
    (``with_pooling``, ``with_padding``). The default leaves the model as written."""

    pooling: Pooling = Pooling.MAX
    padding: Padding = Padding.MODEL

    def __post_init__(self) -> None:  # a member of the enum or its string, as the API takes them
        object.__setattr__(self, "pooling", parse(Pooling, self.pooling, "pooling"))
        object.__setattr__(self, "padding", parse(Padding, self.padding, "padding"))

    def describe(self) -> str:
        return f"{self.pooling} pooling, {self.padding} padding"


def with_pooling(model: nn.Module, pooling: Pooling) -> nn.Module:
    """``model`` with every max pooling replaced by average pooling of the same window (``avg``),
    as Gatys et al. synthesized; in place, the weights are the same."""
    if pooling == Pooling.AVG:
        for parent in model.modules():
            for name, m in parent.named_children():
                if isinstance(m, nn.MaxPool2d):
                    setattr(parent, name, nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode))
    return model


def with_padding(model: nn.Module, padding: Padding) -> nn.Module:
    """``model`` with every padded conv padding by reflection (``"reflect"``, as AdaIN's encoder's
    ``ReflectionPad2d(1)`` before each 3x3 conv does) or by zeros (``"zeros"``); ``"model"`` leaves each
    conv's ``padding_mode`` as written (reflect, circular, ...). In place, same weights."""
    if padding == Padding.MODEL:
        return model
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and any(p > 0 for p in m._reversed_padding_repeated_twice):
            m.padding_mode = "reflect" if padding == Padding.REFLECT else "zeros"
    return model


def load_model(
    arch: str,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    memory_format: torch.memory_format = torch.contiguous_format,
    forward: ForwardPolicy = ForwardPolicy(),
    add_affine: bool = False,
) -> nn.Module:
    """An eval-mode ``arch`` carrying ``state_dict`` (features-only weights: no avgpool and classifier),
    run under the ``forward`` policy's pooling and padding (see ``with_pooling``, ``with_padding``).

    A norm without affine parameters gets them (``analysis.topology.with_affine``) when ``state_dict`` holds
    them (a checkpoint written with ``--add-affine``) or ``add_affine`` asks for it (weight 1, bias 0)."""
    model = build_model(arch, device="meta")
    state_dict = upcast_half(state_dict)  # half-precision weights run in float32 (assign=True keeps dtypes)
    strict = not is_features_only(state_dict)
    extra = affine_keys(arch)
    if add_affine or any(k in state_dict for k in extra):
        with_affine(model, topology(arch, True))
        ones_zeros = {k: torch.ones(v) if k.endswith(".weight") else torch.zeros(v) for k, v in extra.items()}
        state_dict = {**{k: v for k, v in ones_zeros.items() if strict or k.startswith("features.")}, **state_dict}
    model.load_state_dict(state_dict, strict=strict, assign=True)
    if not strict:  # torchvision's VGG layout: features, avgpool, classifier
        model.avgpool, model.classifier = nn.Identity(), nn.Identity()
    model = with_padding(with_pooling(model, forward.pooling), forward.padding)
    return model.to(device).to(memory_format=memory_format).eval()
