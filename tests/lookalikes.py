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
