"""Weights (files, names, random:SEED), arch inference, and safe checkpoint I/O."""

import urllib.error

import pytest
import torch
from torch import nn

from conftest import TINY
from vggnorm.defaults import VGG_ARCHS
from vggnorm.errors import CheckpointError, UsageError, WeightsUnavailableError
from vggnorm.io.checkpoint import load_state_dict, save_state_dict, state_dict_sha256
from vggnorm.io.models import build_model, infer_arch
from vggnorm.io.weights import resolve_weights


@pytest.mark.parametrize("arch", VGG_ARCHS)
def test_infer_arch_from_keys_and_shapes(arch):
    sd = build_model(arch, device="meta").state_dict()
    assert infer_arch(sd) == arch
    assert infer_arch({k: v for k, v in sd.items() if k.startswith("features.")}) == arch


def test_infer_arch_refuses_other_networks():
    with pytest.raises(CheckpointError, match="matches no torchvision VGG"):
        infer_arch(nn.Linear(3, 4).state_dict())


def test_random_spec_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = resolve_weights("random:7", arch=TINY["tiny"])
    assert torch.equal(torch.rand(1), expected_next)
    b = resolve_weights("random:7", arch=TINY["tiny"])
    c = resolve_weights("random:8", arch=TINY["tiny"])
    assert a.sha256 == b.sha256 != c.sha256
    assert a.arch == TINY["tiny"] and a.spec == "random:7"


@pytest.mark.parametrize(
    ("spec", "arch", "error", "message"),
    [
        ("random:x", "vgg11", UsageError, "integer SEED"),
        ("random:1", None, UsageError, "--arch"),
        ("NOT_A_WEIGHT", "vgg11", UsageError, "neither an existing file nor a torchvision weights name"),
        ("missing/file.pth", None, CheckpointError, "does not exist"),
    ],
)
def test_bad_specs_have_clear_errors(spec, arch, error, message):
    with pytest.raises(error, match=message):
        resolve_weights(spec, arch=arch)


def test_torchvision_weights_offline_says_how_to_pass_a_file(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as e:
        resolve_weights("IMAGENET1K_V1", arch="vgg19")
    msg = str(e.value)
    assert "vgg19-dcbb9e9d.pth" in msg and "--weights PATH" in msg and str(tmp_path) in msg


def test_prefixes_are_stripped_and_hash_ignores_format(tmp_path, tiny_vgg):
    sd = tiny_vgg().state_dict()
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "dp.pth")
    save_state_dict(sd, tmp_path / "m.safetensors", force=False, metadata={"arch": "tiny"})
    a, b = load_state_dict(tmp_path / "dp.pth"), load_state_dict(tmp_path / "m.safetensors")
    assert set(a) == set(sd) == set(b)
    assert state_dict_sha256(a) == state_dict_sha256(b) == state_dict_sha256(sd)


def test_pickled_model_is_refused_without_running_code(tmp_path, tiny_vgg):
    torch.save(tiny_vgg(), tmp_path / "full.pth")
    with pytest.raises(CheckpointError, match="never unpickles code"):
        load_state_dict(tmp_path / "full.pth")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated"])
def test_unreadable_checkpoints(tmp_path, content):
    (tmp_path / "bad.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_state_dict(tmp_path / "bad.pth")


def test_a_file_for_another_arch_is_refused(tmp_path, tiny_vgg):
    sd = build_model("vgg11", device="meta").state_dict()
    sd = {k: torch.zeros(v.shape) for k, v in sd.items() if k.startswith("features.")}
    del sd["features.0.bias"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="matches no torchvision VGG"):
        resolve_weights(str(tmp_path / "broken.pth"), arch=None)
    with pytest.raises(CheckpointError, match="missing keys: features.0.bias"):
        resolve_weights(str(tmp_path / "broken.pth"), arch="vgg11")


def test_an_image_given_as_a_checkpoint_is_not_called_a_pickled_model(tmp_path, photos):
    jpeg = next(iter(sorted(photos.iterdir())))
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as e:
        load_state_dict(jpeg)
    assert "pickled" not in str(e.value)


@pytest.mark.parametrize("arch", VGG_ARCHS)
def test_vggnorms_vgg_is_torchvisions(arch):
    """vggnorm builds VGGs without importing torchvision; the module tree must be torchvision's."""
    import torchvision

    from vggnorm.io.models import VGG

    with torch.device("meta"):
        ours, theirs = VGG(arch), torchvision.models.get_model(arch, weights=None)
    assert [(n, repr(m)) for n, m in ours.named_modules() if n] == [
        (n, repr(m)) for n, m in theirs.named_modules() if n
    ]
    # apply's `loads` check loads into ours for torchvision's: a strict load checks these keys and shapes
    assert [(k, v.shape, v.dtype) for k, v in ours.state_dict().items()] == [
        (k, v.shape, v.dtype) for k, v in theirs.state_dict().items()
    ]
    if arch == "vgg11_bn":  # and so is the forward pass
        theirs = theirs.to_empty(device="cpu").eval()
        torch.manual_seed(0)
        for t in theirs.state_dict().values():
            t.copy_(torch.rand_like(t, dtype=torch.float32).to(t.dtype) * 0.1)
        ours = ours.to_empty(device="cpu").eval()
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x))


def test_legacy_format_checkpoints_load_without_mmap(tmp_path, tiny_vgg):
    """Checkpoints load memory-mapped; torch's pre-1.6 (non-zip) format cannot be, and still loads."""
    sd = tiny_vgg().state_dict()
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    loaded = load_state_dict(tmp_path / "legacy.pth")
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], v) for k, v in sd.items())


@pytest.mark.parametrize("arch", ["vgg11", "alexnet", "resnet18", "squeezenet1_0"])
@pytest.mark.parametrize("crop", [40, 112, 224])
def test_the_probe_is_the_smallest_size_at_most_32_the_model_takes_else_its_smallest(arch, crop):
    from vggnorm.analysis.shapes import input_fits
    from vggnorm.io.models import build_model, min_input_size, probe_size

    fits = input_fits(build_model(arch, device="meta").eval())
    smallest = min_input_size(arch)
    assert fits(smallest) and not fits(smallest - 1)
    expected = max(min(32, crop), smallest)
    assert probe_size(arch, crop) == (expected if fits(expected) else crop)
