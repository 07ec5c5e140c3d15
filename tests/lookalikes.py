"""Small VGG look-alikes that the tests pass to vggnorm as models of their own (``--model``).

torchvision's VGG always carries a classifier of about 120M parameters; these have its layout
(features / avgpool / classifier, the same module paths for the first convs) at a size tests can
afford. ``MODEL`` and ``MODEL_BN`` are the ``--model`` values of the two factories.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CFG = (4, "M", 8, 6, "M", 5)
GATYS_BLOCKS = [[4], [8, 6], [5]]  # conv{block}_{i} widths of CFG
POOL = 3  # AdaptiveAvgPool2d((3, 3)): P = 9 positions per channel into the first Linear


class TinyVGG(nn.Module):
    """torchvision's VGG layout (features / avgpool / classifier) at a size tests can afford."""

    def __init__(self, cfg: tuple = CFG, *, bn: bool = False, pool: int = POOL, classes: int = 7):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), *([nn.BatchNorm2d(v)] if bn else []), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Linear(c * pool * pool, 12),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(12, 12),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(12, classes),
        )
        if bn:  # non-trivial BatchNorm (as a fine-tuned model has), so its fold is exercised
            g = torch.Generator().manual_seed(1)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    n = m.num_features
                    m.weight.data = torch.rand(n, generator=g) + 0.5
                    m.bias.data = torch.randn(n, generator=g) * 0.3
                    m.running_mean = torch.randn(n, generator=g) * 0.2
                    m.running_var = torch.rand(n, generator=g) + 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def tiny_vgg() -> TinyVGG:
    return TinyVGG()


def tiny_vgg_bn() -> TinyVGG:
    return TinyVGG(bn=True)


MODEL = f"{Path(__file__).resolve()}:tiny_vgg"
MODEL_BN = f"{Path(__file__).resolve()}:tiny_vgg_bn"


# ---- beyond VGG: the structures the analysis accepts -----------------------------------------------


def _randomize_affine(model: nn.Module, seed: int = 2) -> nn.Module:
    """Non-trivial norm parameters (as a trained model has), so their fold is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d, nn.BatchNorm2d)) and m.weight is not None:
            n = m.weight.numel()
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.3
    return model


def group_norm_net() -> nn.Sequential:
    """A custom Sequential: conv -> GroupNorm(affine) -> ReLU, pooling, a classifier."""
    return _randomize_affine(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 6, 3, padding=1),
            nn.GroupNorm(3, 6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(6 * 4, 5),
        )
    )


class InstanceNormNet(nn.Module):
    """Johnson-style: reflection pad -> conv -> InstanceNorm(affine) -> LeakyReLU, then a PReLU site."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(3, 6, 3),
            nn.InstanceNorm2d(6, affine=affine),
            nn.LeakyReLU(0.2),
            nn.Conv2d(6, 5, 3, padding=1),
            nn.InstanceNorm2d(5, affine=affine),
            nn.LeakyReLU(0.2),
            nn.Conv2d(5, 4, 3, padding=1, bias=False),
            nn.PReLU(4),
        )
        self.head = nn.Conv2d(4, 3, 1)
        _randomize_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def instance_norm_net() -> InstanceNormNet:
    return InstanceNormNet()


def instance_norm_no_affine_net() -> InstanceNormNet:
    return InstanceNormNet(affine=False)


class CatNet(nn.Module):
    """Two conv -> ReLU branches concatenated with the image along the channels, a grouped conv
    reading across the pieces, a depthwise conv, and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 5, 1), nn.ReLU())
        self.mix = nn.Conv2d(12, 8, 3, padding=1, groups=4)
        self.mix_relu = nn.ReLU()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.depthwise_relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x), x], dim=1)
        y = self.depthwise_relu(self.depthwise(self.mix_relu(self.mix(y))))
        return self.fc(torch.flatten(self.pool(y), 1))


def cat_net() -> CatNet:
    return CatNet()


class FunctionalNet(nn.Module):
    """Older code's style: functional pooling, padding and dropout, ``x.view(N, -1)``, ``x.mean([2, 3])``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 4, 3), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(6 * 2 * 2, 3)
        # a second head: global mean pooling (MNASNet's x.mean([2, 3])) into a Linear
        self.conv2b, self.relu2b, self.head = nn.Conv2d(6, 5, 1), nn.ReLU(), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.relu1(self.conv1(x)), 2)
        x = nn.functional.dropout(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), 0.5, self.training)
        x = nn.functional.adaptive_avg_pool2d(self.relu2(self.conv2(x)), 2) * 0.5
        return self.fc(x.view(x.size(0), -1)) + self.head(self.relu2b(self.conv2b(x)).mean([2, 3]))


def functional_net() -> FunctionalNet:
    return FunctionalNet()


class ProjectedResidualNet(nn.Module):
    """A residual block whose identity path is a projection conv (RegNet's and ResNet's downsampling
    blocks): both convs read the stem's scaled channels and compensate them, the add sums the outputs of
    two BatchNorms, and the ReLU after it is a site whose scale both BatchNorms carry."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.branch = nn.Sequential(
            nn.Conv2d(6, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
        )
        self.proj = nn.Sequential(nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8))
        self.after_add = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)
        _randomize_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(self.after_add(self.branch(x) + self.proj(x)))


def projected_residual_net() -> ProjectedResidualNet:
    return ProjectedResidualNet()


class ResidualNet(nn.Module):
    """A conv -> ReLU stem and torchvision's ResNet basic block, whose last ReLU is the output: the stream
    (the stem's ReLU and the block's ReLU after its add) reaches the output uncompensated, so it is left
    unscaled; the block's first ReLU is normalized."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block = BasicBlock(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


class StreamNet(nn.Module):
    """A conv -> BN -> ReLU stem and two of torchvision's ResNet basic blocks, then a 1x1 conv head: one
    residual stream of three sites (the stem's ReLU and each block's ReLU after its add)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        _randomize_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def stream_net() -> StreamNet:
    return StreamNet()


def stream_net_wide() -> nn.Module:
    """Another model than ``stream_net`` (a VGG-like), for statistics given with the wrong --model."""
    return TinyVGG()


def activation_net(activation: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), activation(), nn.Conv2d(4, 2, 1))


def relu6_net() -> nn.Sequential:
    return activation_net(nn.ReLU6)


def gelu_net() -> nn.Sequential:
    return activation_net(nn.GELU)


def spec(name: str) -> str:
    """The ``--model`` value of a factory in this file."""
    return f"{Path(__file__).resolve()}:{name}"


# ---- soundness: models whose forward is more than their features -----------------------------------


class ShiftedVGG(TinyVGG):
    """LPIPS-style: the forward normalizes its input, ``(x - shift) / scale``, before ``features``; a
    measurement of ``features`` alone sees other inputs than the model does."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.shift) / self.scale)


def shifted_vgg() -> ShiftedVGG:
    return ShiftedVGG()


class StemVGG(TinyVGG):
    """A stem conv -> ReLU run in forward before ``features``: a site outside ``features``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.stem_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.stem_relu(self.stem(x)))


def stem_vgg() -> StemVGG:
    return StemVGG()


class PaddedNet(nn.Module):
    """Convs that pad by reflection and circularly (``padding_mode``), as style-transfer nets do."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 5, 3, padding=1, padding_mode="circular"),
            nn.ReLU(),
        )
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean([2, 3]))


def padded_net() -> PaddedNet:
    return PaddedNet()


class TwoActivationsNet(nn.Module):
    """One conv's output read by two activation modules (a ReLU and a LeakyReLU), each into a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu, self.leaky = nn.ReLU(), nn.LeakyReLU(0.1)
        self.a, self.b = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.a(self.relu(y)) + self.b(self.leaky(y))).mean([2, 3]))


def two_activations_net() -> TwoActivationsNet:
    return TwoActivationsNet()
