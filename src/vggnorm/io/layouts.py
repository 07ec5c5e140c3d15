"""Every on-disk layout of a VGG state_dict and its mapping to torchvision's module paths.

* ``torchvision``: ``features.0.weight`` ...: loads into ``torchvision.models.get_model(arch)``.
* ``gatys``: ``conv1_1.weight`` ... ``conv5_4.bias``, features only, no BatchNorm (a ``_bn`` arch's
  BatchNorm is folded into its convs): what the Gatys notebook's ``VGG`` class loads.
* ``adain``: VGG19's features as AdaIN's encoder (naoto0804/pytorch-AdaIN ``net.vgg``): an
  ``nn.Sequential`` of a 1x1 conv that does the preprocessing (RGB in [0, 1] in), then
  ``ReflectionPad2d(1)``, 3x3 ``Conv2d`` (no padding), ``ReLU`` per conv and ceil-mode max pooling;
  keys ``0.weight``, ``2.weight``, ``5.weight``, ... ``51.bias``.

Layer names users know come from here too: ``features.0`` is ``conv1_1`` and its ReLU ``relu1_1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from vggnorm.core.state import StateDict
from vggnorm.errors import CheckpointError, StatsFileError, StatsMismatchError
from vggnorm.io.models import bn_eps, conv_names, known_archs
from vggnorm.options import InputConvention, Layout

if TYPE_CHECKING:
    from vggnorm.io.data import Measurement


def is_gatys_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "conv1_1.weight" in state_dict


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> Layout:
    if is_gatys_layout(state_dict):
        return Layout.GATYS
    return Layout.ADAIN if is_adain_layout(state_dict) else Layout.TORCHVISION


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
    out: StateDict = {}
    for conv, name in names.items():
        w, b = conv_without_bn(state_dict, conv, bn)
        out[f"{name}.weight"] = w
        if b is not None:
            out[f"{name}.bias"] = b
    return out


def conv_without_bn(
    state_dict: Mapping[str, torch.Tensor], conv: str, bn: Mapping[str, tuple[str, float]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A conv's weight and bias, with its BatchNorm (if any) folded in, in float64 (eval mode)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    w = state_dict[f"{conv}.weight"]
    b = state_dict.get(f"{conv}.bias")
    if conv not in bn:
        return w, b
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
    return fw.detach().to(w.dtype), fb.detach().to(w.dtype)


ADAIN_ARCHS = ("vgg19", "vgg19_bn")


def adain_indices(arch: str) -> dict[str, int]:
    """Each conv's index in AdaIN's ``nn.Sequential``: 0 is the preprocessing conv, then each conv
    is preceded by its ``ReflectionPad2d`` and followed by its ReLU; a BatchNorm is folded away."""
    from torch import nn

    from vggnorm.io.models import build_model

    features = build_model(arch, device="meta").features
    assert isinstance(features, nn.Module)
    out, index = {}, 1
    for name, m in features.named_children():
        if isinstance(m, nn.Conv2d):
            out[f"features.{name}"] = index + 1
            index += 2
        elif isinstance(m, (nn.ReLU, nn.MaxPool2d)):
            index += 1
    return out


def preprocessing_conv(
    convention: InputConvention, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1x1 conv that turns RGB in [0, 1] into the network's input, as measured: torchvision's
    ``(x - mean) / std``, Caffe's BGR, 0-255, minus the (BGR) mean, or MatConvNet's RGB, 0-255, minus the mean."""
    w = torch.zeros(3, 3, 1, 1, dtype=torch.float64)
    if convention in (InputConvention.CAFFE, InputConvention.MATCONVNET):
        for k in range(3):  # caffe: output channel k (B, G, R) reads input channel 2 - k (R, G, B)
            w[k, 2 - k if convention == InputConvention.CAFFE else k] = 255.0
        b = -torch.tensor(mean, dtype=torch.float64)
    else:
        std_t = torch.tensor(std, dtype=torch.float64)
        w[range(3), range(3), 0, 0] = 1 / std_t
        b = -torch.tensor(mean, dtype=torch.float64) / std_t
    return w.float(), b.float()


def to_adain_layout(
    state_dict: Mapping[str, torch.Tensor],
    arch: str,
    convention: InputConvention,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> StateDict:
    """VGG19's features (torchvision layout) as AdaIN's encoder state_dict (BatchNorm folded in)."""
    if arch not in ADAIN_ARCHS:
        raise StatsMismatchError(
            f"--layout adain is VGG19's encoder; {arch} is another network (use vgg19 or vgg19_bn)"
        )
    w0, b0 = preprocessing_conv(convention, mean, std)
    out: StateDict = {"0.weight": w0, "0.bias": b0}
    bn = bn_eps(arch)
    for conv, index in adain_indices(arch).items():
        w, b = conv_without_bn(state_dict, conv, bn)
        out[f"{index}.weight"] = w
        if b is not None:
            out[f"{index}.bias"] = b
    return out


def is_adain_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "0.weight" in state_dict and tuple(state_dict["0.weight"].shape) == (3, 3, 1, 1)


def from_adain_layout(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """AdaIN's encoder as vgg19's features (torchvision layout), without the preprocessing conv."""
    inverse = {index: conv for conv, index in adain_indices("vgg19").items()}
    out: StateDict = {}
    for key, value in state_dict.items():
        stem, _, leaf = key.rpartition(".")
        if stem == "0":
            continue
        if not stem.isdigit() or int(stem) not in inverse:
            raise CheckpointError(f"unexpected key {key} in an AdaIN-layout checkpoint")
        out[f"{inverse[int(stem)]}.{leaf}"] = value
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
    if is_adain_layout(state_dict):
        return from_adain_layout(state_dict)
    if not is_gatys_layout(state_dict):
        return dict(state_dict)
    stems = {k.rpartition(".")[0] for k in state_dict}
    for arch in known_archs():
        if not bn_eps(arch) and set(conv_names(arch).values()) == stems:
            return from_gatys_layout(state_dict, conv_names(arch))
    raise CheckpointError(f"the Gatys-layout state_dict has convs {sorted(stems)}, which fit no VGG")


def export_layout(
    state_dict: Mapping[str, torch.Tensor], arch: str, layout: Layout, policy: Measurement | None = None
) -> StateDict:
    """``state_dict`` (torchvision layout) in the requested ``layout``; ``adain`` needs the measurement
    ``policy`` (its input convention, mean and std) that its preprocessing conv encodes."""
    if layout in (Layout.TORCHVISION, Layout.KERAS, Layout.MATCONVNET):  # the latter two: formats.write_foreign
        return dict(state_dict)
    if layout == Layout.GATYS:
        return to_gatys_layout(state_dict, conv_names(arch), bn_eps(arch))
    if policy is None:
        raise StatsFileError("the adain layout needs the measurement policy (its first conv does the preprocessing)")
    return to_adain_layout(state_dict, arch, policy.convention, policy.transform.mean, policy.transform.std)


def display_name(path: str, arch: str | None) -> str:
    """``features.0 (conv1_1)``: the module path with the Gatys name users know, where there is one."""
    if arch is not None and arch in known_archs():
        name = conv_names(arch).get(path)
        if name is not None:
            return f"{path} ({name})"
    return path
