"""Accepted means exact, verified means true, through the command line.

Each model is measured, folded and verified by the CLI; then the test checks the result with code
of its own: the user's model class, the whole ``forward``, its own float64 hooks and dead rule.
"""

from __future__ import annotations

import json
import shutil

import h5py
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lookalikes as L
import vggnorm
from conftest import invoke
from vggnorm.errors import CheckpointError
from vggnorm.io.data import ImageTransform, find_images, load_rgb
from vggnorm.io.models import import_user_model
from vggnorm.io.statsfile import read_stats
from vggnorm.io.weights import random_state_dict

SIZE = ["--resize", "40", "--crop", "32", "--workers", 0, "--no-progress"]


def _images(photos) -> torch.Tensor:
    transform = ImageTransform(resize=40, crop=32).module(dtype=torch.float64)  # as compute-stats --precision fp64
    return torch.stack([transform(load_rgb(f)) for f in find_images(photos)])


def _own_means(model: nn.Module, x: torch.Tensor, paths: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-channel means of the modules at ``paths`` over images and positions, from the whole forward."""
    modules = dict(model.named_modules())
    means: dict[str, torch.Tensor] = {}
    handles = [
        modules[p].register_forward_hook(
            lambda m, a, out, p=p: means.__setitem__(p, out.transpose(0, 1).flatten(1).mean(1))
        )
        for p in paths
    ]
    with torch.no_grad():
        y = model(x)
    for h in handles:
        h.remove()
    return means, y


def _live(mean: torch.Tensor) -> torch.Tensor:
    positive = mean[mean > 0]
    return mean > max(1e-6, 1e-3 * float(positive.median()))


def _run(name: str, photos, d, *extra: str):
    spec = import_user_model(L.spec(name))
    ckpt = d / "m.pth"
    torch.save(random_state_dict(spec, 0), ckpt)
    stats, out = d / "s.h5", d / "n.pth"
    r = invoke(
        "compute-stats", photos, "--model", spec, "--weights", ckpt, "-o", stats, *SIZE, "--precision", "fp64", *extra
    )
    assert r.exit_code == 0, r.output
    r = invoke("apply", ckpt, "--stats", stats, "-o", out)
    assert r.exit_code == 0, r.output
    return spec, ckpt, stats, out


def _check_independently(name: str, ckpt, stats_path, out, photos, padding: str | None = None) -> None:
    factory = getattr(L, name)
    original, normalized = factory().double().eval(), factory().double().eval()
    original.load_state_dict(torch.load(ckpt, weights_only=True))
    normalized.load_state_dict(torch.load(out, weights_only=True))
    if padding:
        for model in (original, normalized):
            for m in model.modules():
                if isinstance(m, nn.Conv2d) and m.padding != (0, 0):
                    m.padding_mode = padding
    stats = read_stats(stats_path)
    paths = [layer.relu for layer in stats.layers.values()]
    x = _images(photos)
    before, y = _own_means(original, x, paths)
    after, y2 = _own_means(normalized, x, paths)
    assert float((y2 - y).abs().max() / y.abs().max()) < 1e-5  # outputs unchanged (float32 weights)
    for conv, layer in stats.layers.items():
        live = _live(before[layer.relu])
        # the statistics are what the model computes when run as written
        torch.testing.assert_close(layer.mean, before[layer.relu], rtol=1e-9, atol=1e-12)
        assert live.any(), conv
        assert float((after[layer.relu][live] - 1).abs().max()) < 1e-5, conv
        torch.testing.assert_close(after[layer.relu][~live], before[layer.relu][~live], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["shifted_vgg", "stem_vgg", "padded_net", "two_activations_net"])
def test_models_whose_forward_is_more_than_their_features_are_exact_and_verified(name, photos, tmp_path):
    spec, ckpt, stats, out = _run(name, photos, tmp_path)
    _check_independently(name, ckpt, stats, out, photos)
    r = invoke("verify", out, "--original", ckpt, "--stats", stats, "--data", photos, "--workers", 0, "--no-progress")
    assert r.exit_code == 0 and "4 passed" in r.stdout, r.output


def test_verify_fails_statistics_measured_through_features_alone(photos, tmp_path):
    """The witness runs the whole forward: statistics measured on ``features`` alone (a shortcut that skips
    the model's own input transform) fold into a checkpoint whose means verify finds wrong."""
    spec, ckpt, stats, _ = _run("shifted_vgg", photos, tmp_path)
    model = L.shifted_vgg().double().eval()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    shortcut = tmp_path / "shortcut.h5"
    shutil.copy(stats, shortcut)
    layers = read_stats(stats).layers
    means, _ = _own_means(
        model.features, _images(photos), [p.removeprefix("features.") for p in (v.relu for v in layers.values())]
    )
    with h5py.File(shortcut, "r+") as f:
        for conv, layer in layers.items():
            mean = means[layer.relu.removeprefix("features.")]
            f[f"layers/{conv}/sum"][...] = (mean * layer.count).numpy()
            f[f"layers/{conv}/mean"][...] = mean.numpy()
    out = tmp_path / "wrong.pth"
    assert invoke("apply", ckpt, "--stats", shortcut, "-o", out).exit_code == 0
    r = invoke("verify", out, "--data", photos, "--workers", 0, "--no-progress", "--format", "json")
    assert r.exit_code == 1, r.output
    means_check = next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "means")
    assert means_check["status"] == "fail" and means_check["figure"] > 0.1


def test_padding_modes_are_measured_as_written_unless_a_policy_is_asked_for(photos, tmp_path):
    """Reflect and circular padding are measured as the model runs them (default ``--padding model``);
    ``--padding zeros`` is a policy asked for by name, recorded, stated in verify's report and honoured."""
    spec, ckpt, stats, out = _run("padded_net", photos, tmp_path)
    assert read_stats(stats).provenance.preprocess["padding"] == "model"
    d = tmp_path / "zeros"
    d.mkdir()
    _, _, zstats, zout = _run("padded_net", photos, d, "--padding", "zeros")
    assert read_stats(zstats).provenance.preprocess["padding"] == "zeros"
    _check_independently("padded_net", ckpt, zstats, zout, photos, padding="zeros")
    r = invoke("verify", zout, "--data", photos, "--workers", 0, "--no-progress", "--format", "json")
    assert r.exit_code == 0, r.output
    assert "zeros padding" in json.dumps(json.loads(r.stdout)["inputs"]["policy"])
    # measured with zeros, the model as written (reflect, circular) does not have means of 1
    with pytest.raises(AssertionError):
        _check_independently("padded_net", ckpt, zstats, zout, photos)


def test_a_means_failure_names_its_cause():
    """Float32 rounding of a nearly silent filter, or a filter whose mean is wrong for another reason."""
    from vggnorm.core.checks import check_means

    scales = {"a": torch.tensor([1.0, 1.0, 0.2, 1e-5], dtype=torch.float64)}
    tampered = check_means({"a": torch.tensor([1.0, 1.0, 1.8, 1.0])}, {"a": []}, scales=scales)
    assert tampered.status == "fail" and "not a rounding effect" in tampered.detail
    assert "nearly silent" not in tampered.detail
    silent = check_means({"a": torch.tensor([1.0, 1.0, 1.0, 1.002])}, {"a": []}, scales=scales)
    assert silent.status == "fail" and "nearly silent" in silent.detail and "--rel-eps" in silent.detail


def test_apply_names_the_cause_of_a_failed_self_check():
    from vggnorm.commands.apply import failure_cause
    from vggnorm.core.checks import Check
    from vggnorm.core.fold import DeadRule

    def cause(figure: float) -> str:
        return failure_cause([Check("activations", "", "fail", figure, 1e-4, "worst layer x")], DeadRule())

    assert "float32 rounding" in cause(3e-4) and "structure" not in cause(3e-4)
    assert "structure vggnorm accepted" in cause(0.8) and "--rel-eps" not in cause(0.8)
    assert "structure vggnorm accepted" in cause(float("nan"))
    assert "do not fit" in failure_cause([Check("loads", "", "fail", detail="missing keys")], DeadRule())


def test_nearly_silent_filters_are_held_to_what_float32_can_hold():
    """A filter whose float32 bound exceeds the tolerance is held to its bound, and no further."""
    from vggnorm.core.checks import check_means

    bounds = {"a": torch.tensor([1e-6, 5e-3], dtype=torch.float64)}
    within = check_means({"a": torch.tensor([1.0, 1.002])}, {"a": []}, bounds=bounds)
    assert within.status == "pass" and "1 nearly silent filter(s) held to" in within.detail
    assert check_means({"a": torch.tensor([1.0, 1.002])}, {"a": []}).status == "fail"  # without the bound
    beyond = check_means({"a": torch.tensor([1.0, 1.01])}, {"a": []}, bounds=bounds)
    assert beyond.status == "fail" and "a filter 1: |mean - 1| 0.01 > bound 0.005" in beyond.detail
    strict = check_means({"a": torch.tensor([1.002, 1.0])}, {"a": []}, bounds=bounds)
    assert strict.status == "fail"  # an ordinary filter keeps the tolerance


def test_the_float32_bound_bounds_what_float32_does():
    """``float32_bounds`` is at least the deviation float32 arithmetic produces in every live filter of a
    random-weight VGG look-alike (the bound verify allows nearly silent filters)."""
    import lookalikes
    import vggnorm
    from vggnorm.core.fold import DeadRule, float32_bounds

    torch.manual_seed(0)
    model = lookalikes.TinyVGG(cfg=(16, "M", 32, 32, "M", 24)).eval()
    x = torch.rand(6, 3, 32, 32) * 2 - 0.5
    stats = vggnorm.measure_means(model.double(), [x.double()], include_classifier=True)
    normalized = vggnorm.normalize_model(model.float(), stats, include_classifier=True)
    topo = vggnorm.analyze(normalized)
    paths = [s.relu for s in topo.all_sites]
    after, _ = _own_means(normalized, x, paths)  # float32 arithmetic
    bounds = float32_bounds(normalized.state_dict(), topo, {s.conv: after[s.relu].double() for s in topo.all_sites})
    assert bounds, "no site got a bound"
    for s in topo.all_sites:
        if s.conv in bounds:
            live = DeadRule().live(stats.layers[s.conv].mean)
            deviation = (after[s.relu].double() - 1).abs()[live]
            assert bool((deviation <= bounds[s.conv][live]).all()), s.conv


def test_a_model_of_one_input_size_is_analysed_without_logged_tracebacks(capfd):
    """Shapes are learned by trying input sizes; the sizes a model cannot take are no error of the user's."""
    import vggnorm

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3))
    assert not vggnorm.analyze(model).refusals
    err = capfd.readouterr().err
    assert "Traceback" not in err and "failed while attempting" not in err, err[:300]


class _HiddenReLUs(nn.Hardtanh):
    """A leaf module (an activation subclass, so the tracer does not look inside) whose forward calls ReLU
    itself: the run's activation calls are not the traced graph's."""

    def forward(self, x):
        return F.relu(x) - F.relu(x - 1)


def test_a_forward_whose_activation_calls_are_not_the_graphs_is_refused_when_measured():
    """Before: measure_means numbered the calls as they came and measured the clamp's ReLU as the conv's."""
    model = nn.Sequential(_HiddenReLUs(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    assert [s.call for s in vggnorm.analyze(model).sites] == [0]
    with pytest.raises(CheckpointError, match="3 times in one forward pass where its traced graph has 1"):
        vggnorm.measure_means(model, [torch.rand(2, 3, 8, 8)])
