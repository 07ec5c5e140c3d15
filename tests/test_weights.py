"""vggnorm.io.weights: weights (a file, random:SEED, a torchvision weights name) resolved to a checked
state_dict, called directly on the look-alikes (tests/lookalikes.py) and small files."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
import torch
from safetensors.torch import save_file as save_safetensors

import lookalikes as L
from vggnorm.errors import CheckpointError, InvalidValuesError, UsageError
from vggnorm.io import weights as W
from vggnorm.io.checkpoint import state_dict_sha256
from vggnorm.io.layouts import export_layout
from vggnorm.io.weights import APPLY, INSPECT, is_file_spec, prefetch_random, random_state_dict, resolve_weights


def seeded(factory, seed: int) -> dict[str, torch.Tensor]:
    """The model's own initialization under ``torch.manual_seed(seed)``, written out here."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().state_dict()


def assert_same(a, b) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- random:SEED -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7])
def test_random_seed_is_the_models_own_initialization_under_that_seed(lookalike_archs, seed):
    w = resolve_weights(f"random:{seed}", arch=lookalike_archs["tiny_bn"])
    assert_same(w.state_dict, seeded(L.tiny_vgg_bn, seed))
    assert (w.spec, w.arch, w.foreign, w.preprocess) == (
        f"random:{seed}",
        lookalike_archs["tiny_bn"],
        None,
        "torchvision",
    )
    assert w.sha256 == state_dict_sha256(seeded(L.tiny_vgg_bn, seed))


def test_random_seeds_are_deterministic_and_distinct(lookalike_archs):
    arch = lookalike_archs["tiny"]
    assert_same(random_state_dict(arch, 3), random_state_dict(arch, 3))
    assert resolve_weights("random:3", arch=arch).sha256 != resolve_weights("random:4", arch=arch).sha256


@pytest.fixture
def fake_vgg_init(monkeypatch):
    """``_vgg_init`` replaced by a one-number draw from the generator it is given (a VGG's real one is 133M
    numbers), recording the thread of each call; and an empty cache of prefetched draws."""
    calls: list[str] = []

    def fake(arch, generator):
        calls.append(threading.current_thread().name)
        if arch == "vgg13":
            raise RuntimeError("the draw failed")
        return {"draw": torch.rand(1, generator=generator, dtype=torch.float64)}

    monkeypatch.setattr(W, "_vgg_init", fake)
    monkeypatch.setattr(W, "_PREFETCHED", {})
    return calls


def test_a_vgg_seed_is_drawn_from_a_generator_seeded_with_it(fake_vgg_init):
    expected = torch.rand(1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(random_state_dict("vgg11", 5)["draw"], expected)
    assert not torch.equal(random_state_dict("vgg11", 6)["draw"], expected)


def test_a_prefetched_draw_is_taken_once_and_equals_the_draw_itself(fake_vgg_init):
    assert prefetch_random("random:5", "vgg11") is True
    assert prefetch_random("random:5", "vgg11") is True  # asked twice: drawn once
    first = random_state_dict("vgg11", 5)
    assert fake_vgg_init == ["vggnorm-random"]  # drawn in the prefetching thread
    again = random_state_dict("vgg11", 5)  # the cache gave its draw away: drawn afresh, here
    assert fake_vgg_init == ["vggnorm-random", threading.current_thread().name]
    assert torch.equal(first["draw"], again["draw"])
    assert W._PREFETCHED == {}


def test_a_failed_prefetched_draw_fails_whoever_takes_it(fake_vgg_init):
    assert prefetch_random("random:1", "vgg13")
    with pytest.raises(RuntimeError, match="the draw failed"):
        random_state_dict("vgg13", 1)


@pytest.mark.parametrize(
    ("spec", "arch"),
    [("random:x", "vgg11"), ("random:-1", "vgg11"), ("w.pth", "vgg11"), ("IMAGENET1K_V1", "vgg11"), ("random:1", "x")],
)
def test_prefetch_is_only_for_random_seeds_of_a_vgg(fake_vgg_init, spec, arch):
    assert prefetch_random(spec, arch) is False
    assert W._PREFETCHED == {} and fake_vgg_init == []


@pytest.mark.parametrize(
    ("spec", "arch", "message"),
    [
        ("random:1.5", "vgg11", "integer SEED"),
        ("random:", "vgg11", "integer SEED"),
        ("random:1", "no_such_net", "unknown architecture 'no_such_net'"),
        ("random:1", "elsewhere.py:Net", "pass --model elsewhere.py:Net"),
    ],
)
def test_a_bad_random_spec_or_arch_is_one_usage_error(spec, arch, message):
    with pytest.raises(UsageError, match=message):
        resolve_weights(spec, arch=arch)


# ---- a torchvision weights name --------------------------------------------------------------------------


def test_a_bad_name_lists_the_known_ones_and_downloads_nothing(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a bad name must not be downloaded")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_download)
    with pytest.raises(UsageError, match="'IMAGENET1K_V9' is neither an existing file") as e:
        resolve_weights("IMAGENET1K_V9", arch="vgg16")
    assert "IMAGENET1K_V1" in str(e.value) and "random:SEED" in str(e.value)


def test_a_name_for_a_user_model_is_refused(lookalike_archs):
    with pytest.raises(UsageError, match="is not a file"):
        resolve_weights("IMAGENET1K_V1", arch=lookalike_archs["tiny"])


# ---- a file ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["pth", "safetensors", "prefixed", "wrapped"])
def test_a_file_in_any_form_resolves_to_the_same_weights_and_hash(lookalike_archs, tmp_path, form):
    sd = seeded(L.tiny_vgg, 2)
    path = tmp_path / f"w.{'safetensors' if form == 'safetensors' else 'pth'}"
    if form == "safetensors":
        save_safetensors(sd, str(path))
    else:
        torch.save(
            {"prefixed": {f"module.{k}": v for k, v in sd.items()}, "wrapped": {"state_dict": sd}}.get(form, sd), path
        )
    w = resolve_weights(str(path), arch=None)  # the arch inferred from keys and shapes
    assert w.arch == lookalike_archs["tiny"] and w.spec == str(path)
    assert_same(w.state_dict, sd)
    assert w.sha256 == state_dict_sha256(sd) and not w.features_only


def test_a_gatys_layout_file_resolves_to_torchvisions_layout_features_only(lookalike_archs, tmp_path):
    arch = lookalike_archs["tiny"]
    sd = seeded(L.tiny_vgg, 0)
    torch.save(export_layout(sd, arch, "gatys"), tmp_path / "g.pth")
    w = resolve_weights(str(tmp_path / "g.pth"), arch=None)
    assert w.arch == arch and w.features_only
    assert_same(w.state_dict, {k: v for k, v in sd.items() if k.startswith("features.")})


def test_the_hash_in_the_background_is_the_same_hash(lookalike_archs, tmp_path):
    torch.save(seeded(L.tiny_vgg, 0), tmp_path / "w.pth")
    now = resolve_weights(str(tmp_path / "w.pth"), arch=lookalike_archs["tiny"])
    later = resolve_weights(str(tmp_path / "w.pth"), arch=lookalike_archs["tiny"], background_hash=True)
    assert isinstance(later.digest, Future) and isinstance(now.digest, str)
    assert later.sha256 == now.sha256


@pytest.mark.parametrize(
    ("given", "hint"),
    [(None, "pass --model"), (INSPECT, "run `vggnorm inspect"), (APPLY, None)],
    ids=["compute-stats", "inspect", "apply"],
)
def test_a_file_of_another_arch_names_it_and_what_the_command_takes(lookalike_archs, tmp_path, given, hint):
    torch.save(seeded(L.tiny_vgg_bn, 0), tmp_path / "bn.pth")
    kwargs = {} if given is None else {"given": given}
    with pytest.raises(CheckpointError, match="holds .*tiny_vgg_bn weights") as e:
        resolve_weights(str(tmp_path / "bn.pth"), arch=lookalike_archs["tiny"], **kwargs)
    message = str(e.value)
    assert message.endswith(f"not {lookalike_archs['tiny']}") if hint is None else hint in message


def test_non_finite_weights_in_a_file_are_refused_naming_the_tensor(lookalike_archs, tmp_path):
    sd = seeded(L.tiny_vgg, 0)
    sd["features.3.bias"][1] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(InvalidValuesError, match=r"nan\.pth: tensor features\.3\.bias"):
        resolve_weights(str(tmp_path / "nan.pth"), arch=lookalike_archs["tiny"])


@pytest.mark.parametrize("content", [b"junk" * 100, None])
def test_an_unreadable_or_missing_file_is_a_checkpoint_error_naming_it(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        resolve_weights(str(path), arch=None)
    assert str(e.value).startswith(str(path))


@pytest.mark.parametrize(
    ("spec", "is_file"),
    [
        ("w.pth", True),
        ("w.pt", True),
        ("w.safetensors", True),
        ("vgg16.h5", True),
        ("imagenet-vgg-verydeep-16.mat", True),
        ("dir/IMAGENET1K_V1", True),
        ("IMAGENET1K_V1", False),
        ("DEFAULT", False),
    ],
)
def test_what_is_taken_as_a_file(spec, is_file):
    assert is_file_spec(spec) is is_file
