"""Build a torchvision VGG by name, resolve a weight SPEC, infer the arch from a state_dict.

A weight SPEC is one of:

* a path to a state_dict (``.pth``/``.pt`` or ``.safetensors``);
* a torchvision weights name such as ``IMAGENET1K_V1`` (loaded through torchvision's own cache);
* ``random:SEED`` -- torchvision's own seeded random initialization, for demos and tests.
"""

from __future__ import annotations

import functools
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from vggnorm.checkpoint import StateDict, from_gatys_layout, is_gatys_layout, load_state_dict, state_dict_sha256
from vggnorm.errors import CheckpointError, WeightsError
from vggnorm.layers import Topology, find_topology, gatys_names

VGG_ARCHS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
DEFAULT_ARCH = "vgg19"
DEFAULT_WEIGHTS = "IMAGENET1K_V1"
RANDOM_PREFIX = "random:"
POOLINGS = ("max", "avg")


def _check_arch(arch: str) -> None:
    if arch not in VGG_ARCHS:
        raise WeightsError(f"unknown architecture {arch!r}; expected one of {', '.join(VGG_ARCHS)}")


def build_model(arch: str, *, device: str | torch.device | None = None) -> nn.Module:
    """A torchvision VGG with torchvision's random initialization (``device="meta"``: structure only)."""
    _check_arch(arch)
    with torch.device(device or "cpu"):
        return torchvision.models.get_model(arch, weights=None)


@functools.cache
def topology(arch: str) -> Topology:
    """The conv -> (BN) -> ReLU sites of ``arch``, read off a model built on the meta device."""
    return find_topology(build_model(arch, device="meta"))


@functools.cache
def _shapes(arch: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_model(arch, device="meta").state_dict().items()}


def is_features_only(state_dict: StateDict) -> bool:
    return all(k.startswith("features.") for k in state_dict)


@functools.cache
def conv_names(arch: str) -> dict[str, str]:
    """Gatys' names (conv1_1 ...) of ``arch``'s convs, keyed by module path."""
    return gatys_names(build_model(arch, device="meta"))


def bn_eps(arch: str) -> dict[str, tuple[str, float]]:
    """For a ``_bn`` arch: conv path -> (its BatchNorm's path, the BatchNorm's eps)."""
    modules = dict(build_model(arch, device="meta").named_modules())
    return {s.conv: (s.bn, float(modules[s.bn].eps)) for s in topology(arch).sites if s.bn is not None}


def to_torchvision_layout(state_dict: StateDict) -> StateDict:
    """A Gatys-layout state_dict (conv1_1.weight ...) as the features of the plain VGG it fits."""
    if not is_gatys_layout(state_dict):
        return state_dict
    stems = {k.rpartition(".")[0] for k in state_dict}
    for arch in VGG_ARCHS:
        if not arch.endswith("_bn") and set(conv_names(arch).values()) == stems:
            return from_gatys_layout(state_dict, conv_names(arch))
    raise CheckpointError(f"the Gatys-layout state_dict has convs {sorted(stems)}, which fit no VGG")


def infer_arch(state_dict: StateDict) -> str:
    """The torchvision VGG whose keys and shapes ``state_dict`` has (features-only state_dicts too)."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    features_only = is_features_only(state_dict)
    for arch in VGG_ARCHS:
        expected = _shapes(arch)
        if features_only:
            expected = {k: v for k, v in expected.items() if k.startswith("features.")}
        if shapes == expected:
            return arch
    convs = sum(1 for k, v in state_dict.items() if k.endswith(".weight") and v.ndim == 4)
    has_bn = any(k.endswith("running_mean") for k in state_dict)
    raise CheckpointError(
        f"the state_dict matches no torchvision VGG ({convs} conv weights, "
        f"{'with' if has_bn else 'without'} BatchNorm, {len(state_dict)} tensors); "
        f"vggnorm handles {', '.join(VGG_ARCHS)} in torchvision's layout"
    )


def check_state_dict(state_dict: StateDict, arch: str, *, features_only: bool = False) -> None:
    """Raise ``CheckpointError`` listing missing, unexpected and mis-shaped keys (sorted)."""
    expected = _shapes(arch)
    if features_only:
        expected = {k: v for k, v in expected.items() if k.startswith("features.")}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if shapes:
            parts.append(
                "wrong shapes: " + ", ".join(f"{k} {tuple(state_dict[k].shape)} != {expected[k]}" for k in shapes)
            )
        raise CheckpointError(f"the state_dict does not fit {arch}: " + "; ".join(parts))


@dataclass(frozen=True)
class Weights:
    """Resolved weights: where they came from and their content hash."""

    spec: str
    arch: str
    state_dict: StateDict
    sha256: str


def _torchvision_weights(arch: str, name: str) -> StateDict:
    enum = torchvision.models.get_model_weights(arch)
    try:
        entry = enum[name]
    except KeyError:
        raise WeightsError(
            f"{name!r} is neither an existing file nor a torchvision weights name for {arch} "
            f"(known: {', '.join(w.name for w in enum)}); pass a path to a state_dict, a weights name, or random:SEED"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)
    try:
        return entry.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise WeightsError(
            f"could not load the {arch} {name} weights: they are not in torchvision's cache ({cached}) "
            f"and downloading {entry.url} failed ({e}). Either download that file on a machine with "
            f"internet and copy it to {cached}, or pass the weights as a file: --weights PATH.pth"
        ) from e


def random_state_dict(arch: str, seed: int) -> StateDict:
    """torchvision's own initialization of ``arch`` under ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch).state_dict()


def resolve_weights(spec: str, *, arch: str | None) -> Weights:
    """Resolve a weight SPEC (path, torchvision name or ``random:SEED``) to a checked state_dict.

    ``arch`` may be ``None`` for a file, whose arch is then inferred from its keys and shapes.
    """
    if spec.startswith(RANDOM_PREFIX):
        seed_text = spec[len(RANDOM_PREFIX) :]
        if not seed_text.isdigit():
            raise WeightsError(f"bad weight SPEC {spec!r}: expected random:SEED with an integer SEED, e.g. random:0")
        if arch is None:
            raise WeightsError(f"{spec} needs an architecture; pass --arch")
        _check_arch(arch)
        sd = random_state_dict(arch, int(seed_text))
    elif os.path.exists(spec) or os.sep in spec or spec.endswith((".pth", ".pt", ".safetensors")):
        try:
            sd = to_torchvision_layout(load_state_dict(spec))
            arch = arch or infer_arch(sd)
            _check_arch(arch)
            check_state_dict(sd, arch, features_only=is_features_only(sd))
        except CheckpointError as e:
            raise WeightsError(f"{spec}: {e}") from e
    else:
        arch = arch or DEFAULT_ARCH
        _check_arch(arch)
        sd = _torchvision_weights(arch, spec)
    return Weights(spec=spec, arch=arch, state_dict=sd, sha256=state_dict_sha256(sd))


def load_model(
    weights: Weights,
    *,
    device: str | torch.device = "cpu",
    memory_format: torch.memory_format = torch.contiguous_format,
    pooling: str = "max",
) -> nn.Module:
    """An eval-mode model carrying ``weights`` (features-only weights: no avgpool and classifier).

    ``pooling="avg"`` replaces every max pooling in ``features`` by average pooling of the same
    window, as Gatys et al. synthesized with; the weights are the same.
    """
    model = build_model(weights.arch, device="meta")
    strict = not is_features_only(weights.state_dict)
    model.load_state_dict(weights.state_dict, strict=strict, assign=True)
    if not strict:
        model.avgpool, model.classifier = nn.Identity(), nn.Identity()
    if pooling not in POOLINGS:
        raise WeightsError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    if pooling == "avg":
        for i, m in enumerate(model.features):
            if isinstance(m, nn.MaxPool2d):
                model.features[i] = nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
    return model.to(device=device, memory_format=memory_format).eval()
