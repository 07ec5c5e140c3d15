"""Every on-disk layout of a VGG state_dict and its mapping to torchvision's module paths.

* ``torchvision``: ``features.0.weight`` ...: loads into ``torchvision.models.get_model(arch)``.
* ``gatys``: ``conv1_1.weight`` ... ``conv5_4.bias``, features only, no BatchNorm (a ``_bn`` arch's
  BatchNorm is folded into its convs): what the Gatys notebook's ``VGG`` class loads.

Layer names users know come from here too: ``features.0`` is ``conv1_1`` and its ReLU ``relu1_1``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vggnorm.checkpoint import StateDict
from vggnorm.defaults import LAYOUTS
from vggnorm.errors import CheckpointError, VggnormError
from vggnorm.models import bn_eps, conv_names, known_archs


def is_gatys_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "conv1_1.weight" in state_dict


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    return "gatys" if is_gatys_layout(state_dict) else "torchvision"


def to_gatys_layout(
    state_dict: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    bn: Mapping[str, tuple[str, float]],
) -> StateDict:
    """Features only, keyed ``conv1_1.weight``, ``conv1_1.bias``, ... as Gatys-style code expects.

    ``names`` maps conv paths to Gatys names; ``bn`` maps a conv path to its BatchNorm path and eps.
    A BatchNorm is folded into its conv first (eval-mode arithmetic, in float64): Gatys' network
    has none, and the folded conv computes the same ReLU input.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    out: StateDict = {}
    for conv, name in names.items():
        w = state_dict[f"{conv}.weight"]
        b = state_dict.get(f"{conv}.bias")
        if conv in bn:
            p, eps = bn[conv]
            fw, fb = fuse_conv_bn_weights(
                w.double(),
                None if b is None else b.double(),
                state_dict[f"{p}.running_mean"].double(),
                state_dict[f"{p}.running_var"].double(),
                eps,
                state_dict[f"{p}.weight"].double(),
                state_dict[f"{p}.bias"].double(),
            )
            w, b = fw.detach().to(w.dtype), fb.detach().to(w.dtype)
        out[f"{name}.weight"] = w
        if b is not None:
            out[f"{name}.bias"] = b
    return out


def from_gatys_layout(state_dict: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> StateDict:
    """The inverse of ``to_gatys_layout`` for a plain (BN-free) arch: back to ``features.N`` keys."""
    inverse = {v: k for k, v in names.items()}
    out: StateDict = {}
    for key, value in state_dict.items():
        stem, _, leaf = key.rpartition(".")
        if stem not in inverse:
            raise CheckpointError(f"unexpected key {key} in a Gatys-layout checkpoint")
        out[f"{inverse[stem]}.{leaf}"] = value
    return out


def to_torchvision_layout(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A state_dict in any layout as torchvision's (a Gatys one: the features of the plain VGG it fits)."""
    if not is_gatys_layout(state_dict):
        return dict(state_dict)
    stems = {k.rpartition(".")[0] for k in state_dict}
    for arch in known_archs():
        if not bn_eps(arch) and set(conv_names(arch).values()) == stems:
            return from_gatys_layout(state_dict, conv_names(arch))
    raise CheckpointError(f"the Gatys-layout state_dict has convs {sorted(stems)}, which fit no VGG")


def export_layout(state_dict: Mapping[str, torch.Tensor], arch: str, layout: str) -> StateDict:
    """``state_dict`` (torchvision layout) in the requested ``layout``."""
    if layout == "torchvision":
        return dict(state_dict)
    if layout == "gatys":
        return to_gatys_layout(state_dict, conv_names(arch), bn_eps(arch))
    raise VggnormError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def display_name(path: str, arch: str | None) -> str:
    """``features.0 (conv1_1)``: the module path with the Gatys name users know, where there is one."""
    if arch is not None and arch in known_archs():
        name = conv_names(arch).get(path)
        if name is not None:
            return f"{path} ({name})"
    return path
