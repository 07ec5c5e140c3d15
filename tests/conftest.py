"""Shared fixtures: a tiny VGG look-alike, real photos from scikit-image, random-weight checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from sample_photos import write_photos  # noqa: E402
from vggnorm.models import random_state_dict  # noqa: E402


class TinyVGG(nn.Module):
    """torchvision's VGG layout (features / avgpool / classifier) at a size tests can afford."""

    def __init__(self, cfg: tuple = (4, "M", 8, 6, "M", 5), *, bn: bool = False, pool: int = 3, classes: int = 7):
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
            nn.Linear(c * pool * pool, 12), nn.ReLU(True), nn.Dropout(), nn.Linear(12, 12), nn.ReLU(True),
            nn.Dropout(), nn.Linear(12, classes),
        )  # fmt: skip
        if bn:  # non-trivial BatchNorm, so the fold of its affine parameters is exercised
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


@pytest.fixture
def tiny_vgg():
    def make(**kwargs) -> TinyVGG:
        torch.manual_seed(0)
        return TinyVGG(**kwargs).eval()

    return make


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Real photographs (scikit-image's bundled ones) as JPEGs."""
    d = tmp_path_factory.mktemp("photos")
    write_photos(d)
    return d


def perturbed_bn(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision initializes BN as the identity; give it real parameters and running stats."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k, v in sd.items():
        if k.endswith("running_var") or (
            k.endswith(".weight") and v.ndim == 1 and k.replace("weight", "running_var") in sd
        ):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean") or (k.endswith(".bias") and k.replace("bias", "running_mean") in sd):
            out[k] = torch.randn(v.shape, generator=g) * 0.2
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random-weight vgg11 and vgg11_bn state_dicts saved to files (what users pass as CKPT)."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for arch in ("vgg11", "vgg11_bn"):
        sd = random_state_dict(arch, 0)
        if arch.endswith("_bn"):
            sd = perturbed_bn(sd)
        out[arch] = d / f"{arch}.pth"
        torch.save(sd, out[arch])
    return out
