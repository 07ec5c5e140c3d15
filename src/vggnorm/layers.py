"""Walk a VGG and return its conv -> (BN) -> ReLU sites, keyed by module path.

Nothing here hard-codes layer indices: the sites come from ``model.named_modules()`` in forward
order, so the same code serves every torchvision VGG and the small look-alikes in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vggnorm.errors import CheckpointError

# Modules that commute with a positive per-channel scale, so they may sit between sites.
_SCALE_COMMUTING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Flatten, nn.Identity)


@dataclass(frozen=True)
class Site:
    """One normalized unit: a conv, its optional BatchNorm, and the ReLU whose output is measured.

    For the classifier's fc sites, ``conv`` is the path of the Linear (``classifier.0``).
    """

    conv: str
    relu: str
    bn: str | None
    in_channels: int
    out_channels: int


@dataclass(frozen=True)
class Topology:
    """The sites in forward order and the Linear that reads ``flatten(avgpool(F_L))``."""

    sites: tuple[Site, ...]
    classifier: str | None
    classifier_in_features: int | None
    fc_sites: tuple[Site, ...] = ()  # Linear -> ReLU in the classifier (fc6, fc7)
    linears: tuple[str, ...] = ()  # every Linear, in forward order

    def next_linear(self, path: str) -> str | None:
        """The Linear after ``path``, which reads its ReLU's output."""
        i = self.linears.index(path)
        return self.linears[i + 1] if i + 1 < len(self.linears) else None

    @property
    def positions_per_channel(self) -> int:
        """``P`` in the SPEC: flattened positions per channel seen by the first Linear (7 * 7)."""
        if self.classifier_in_features is None:
            raise ValueError("this topology has no classifier")
        return self.classifier_in_features // self.sites[-1].out_channels


def find_topology(model: nn.Module) -> Topology:
    """Return the conv -> (BN) -> ReLU sites of ``model`` in forward order.

    Raises ``CheckpointError`` for a structure the fold cannot handle (a conv not followed by a
    ReLU, an unknown module between a conv and its ReLU).
    """
    sites: list[Site] = []
    conv: tuple[str, nn.Conv2d] | None = None
    bn: str | None = None
    classifier: str | None = None
    classifier_in: int | None = None
    fc_sites: list[Site] = []
    linears: list[str] = []
    linear: tuple[str, nn.Linear] | None = None
    for path, module in model.named_modules():
        if list(module.children()):
            continue
        if isinstance(module, nn.Conv2d):
            if conv is not None:
                raise CheckpointError(f"conv {conv[0]} is followed by conv {path} with no ReLU between them")
            conv, bn = (path, module), None
        elif isinstance(module, nn.BatchNorm2d) and conv is not None:
            bn = path
        elif isinstance(module, nn.ReLU) and conv is not None:
            sites.append(Site(conv[0], path, bn, conv[1].in_channels, conv[1].out_channels))
            conv, bn = None, None
        elif isinstance(module, nn.ReLU) and linear is not None:
            fc_sites.append(Site(linear[0], path, None, linear[1].in_features, linear[1].out_features))
            linear = None
        elif isinstance(module, nn.Linear):
            if classifier is None:
                classifier, classifier_in = path, module.in_features
            linears.append(path)
            linear = (path, module)
        elif conv is not None and not isinstance(module, _SCALE_COMMUTING):
            raise CheckpointError(
                f"cannot normalize: {type(module).__name__} {path} sits between conv {conv[0]} and its ReLU"
            )
    if conv is not None:
        raise CheckpointError(f"conv {conv[0]} has no ReLU after it")
    if not sites:
        raise CheckpointError("the model has no conv -> ReLU layers to normalize")
    if classifier_in is not None and classifier_in % sites[-1].out_channels:
        raise CheckpointError(
            f"classifier {classifier} has {classifier_in} inputs, not a multiple of the "
            f"{sites[-1].out_channels} channels of the last conv"
        )
    return Topology(tuple(sites), classifier, classifier_in, tuple(fc_sites), tuple(linears))


def gatys_names(model: nn.Module) -> dict[str, str]:
    """Gatys' (Caffe's) name of each conv, keyed by module path: ``conv{block}_{i}``.

    A block is a pooling stage: the count restarts after every pooling layer, so vgg19's
    ``features.0`` is ``conv1_1`` and ``features.34`` is ``conv5_4``.
    """
    names: dict[str, str] = {}
    block, i = 1, 0
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            i += 1
            names[path] = f"conv{block}_{i}"
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and i:
            block, i = block + 1, 0
    return names
