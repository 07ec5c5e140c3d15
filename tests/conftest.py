"""Shared fixtures: tiny VGG look-alikes, real photos from scikit-image, random-weight checkpoints."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from collections.abc import Iterator, Mapping  # noqa: E402

from lookalikes import MODEL, MODEL_BN, TinyVGG  # noqa: E402
from sample_photos import write_photos  # noqa: E402
from vggnorm.io.models import import_user_model  # noqa: E402
from vggnorm.io.weights import random_state_dict  # noqa: E402


class LookalikeArchs(Mapping[str, str]):
    """The look-alikes as --model archs, keyed "tiny" and "tiny_bn": ``TINY[key]`` is the arch vggnorm
    records the model as, in this process (CliRunner) as in subprocesses (they pass --model).

    Naming one imports it into vggnorm's registry of user models (``import_user_model``, idempotent), the
    registry that arch inference searches: importing this conftest registers nothing, only a test (or a test
    module's constant) that names a look-alike does, and the ``lookalike_archs`` fixture registers both."""

    SPECS = {"tiny": MODEL, "tiny_bn": MODEL_BN}

    def __getitem__(self, key: str) -> str:
        return import_user_model(self.SPECS[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.SPECS)

    def __len__(self) -> int:
        return len(self.SPECS)


TINY = LookalikeArchs()


@pytest.fixture(scope="session")
def lookalike_archs() -> dict[str, str]:
    """Both look-alikes registered as user models: {"tiny": arch, "tiny_bn": arch}."""
    return dict(TINY)


@pytest.fixture(scope="session", autouse=True)
def temporaries_under_basetemp(tmp_path_factory):
    """Every temporary file of the run (torchrun's torchelastic_* folders, torch's caches, subprocesses')
    goes under pytest's basetemp, which a passing run removes (``tmp_path_retention_policy = "failed"``):
    a passing ``make test`` leaves nothing in the temp folder."""
    folder = tmp_path_factory.mktemp("tmpdir")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(folder))
        mp.setattr(tempfile, "tempdir", str(folder))
        yield folder


def invoke(*args):
    """Run the CLI in this process, arguments as strings; exceptions other than exits propagate."""
    from click.testing import CliRunner

    from vggnorm.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def gallery_model():
    """A gallery entry's model and its images, by the entry's name (``tests/gallery.py``): how the gallery's own
    tests and the analysis tests build one, freshly for each test (a model a test folds is its own)."""
    from gallery import model_and_images

    return model_and_images


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
    """Random-weight look-alike state_dicts saved to files (what users pass as CKPT), keyed "tiny",
    "tiny_bn"; and torchvision's vgg11 and vgg11_bn features (the real archs, without the 120M-parameter
    classifier), keyed "vgg11", "vgg11_bn"."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for key, arch in (*TINY.items(), ("vgg11", "vgg11"), ("vgg11_bn", "vgg11_bn")):
        sd = random_state_dict(arch, 0) if key in TINY else features_state_dict(arch)
        if arch.endswith("_bn") and key not in TINY:
            sd = perturbed_bn(sd)
        out[key] = d / f"{key}.pth"
        torch.save(sd, out[key])
    return out


def features_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's seeded initialization of ``arch``'s features only (no classifier to build)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = vgg_features(arch)
    return {f"features.{k}": v for k, v in features.state_dict().items()}


def vgg_features(arch: str) -> torch.nn.Module:
    from torchvision.models import vgg

    cfg = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}[arch.removesuffix("_bn")]
    features = vgg.make_layers(vgg.cfgs[cfg], batch_norm=arch.endswith("_bn"))
    for m in features.modules():  # torchvision's VGG.__init__ initialization of the convs
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.constant_(m.bias, 0)
    return features


def one_line_error(r, *words, code=1):
    """A CLI result that failed as users should see it: exit ``code``, one line on stderr naming ``words``,
    no traceback."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
