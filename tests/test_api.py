"""The Python API on models and batches: each function keeps its promise.

The documented example (docs/how-to/own-model.md, "From Python, no files") runs, with its own assert on the
report, in tests/test_docs.py with every other code block of the docs.
"""

import pytest
import torch

import vggnorm
from vggnorm.errors import StatsMismatchError


@pytest.mark.parametrize("bn", [False, True])
def test_normalize_model_gives_means_of_one_and_the_same_logits(tiny_vgg, bn):
    model = tiny_vgg(bn=bn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stats = vggnorm.measure_means(model, batches)
    assert (
        stats.num_images == 12
        and list(stats.layers) == ["features.0", "features.3", "features.5", "features.8"][: len(stats.layers)]
        or bn
    )
    normalized = vggnorm.normalize_model(model, stats)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is untouched
    again = vggnorm.measure_means(normalized, batches)
    layer_scales = vggnorm.scales(model, stats)
    for name, mean in again.means().items():
        live = torch.ones_like(mean, dtype=torch.bool)
        live[layer_scales[name].dead] = False
        torch.testing.assert_close(mean[live], torch.ones_like(mean[live]), rtol=1e-3, atol=0)
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        y, y2 = model.double()(x), normalized.double()(x)
    # float32 weights rounded after the fold: ~1e-7 relative
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()))


def test_verify_models_passes_the_normalization_and_fails_a_tampered_copy(tiny_vgg):
    model = tiny_vgg()
    batches = [torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    stats = vggnorm.measure_means(model, batches)
    normalized = vggnorm.normalize_model(model, stats)
    report = vggnorm.verify_models(model, normalized, stats, batches=batches)
    assert report.passed and [c.status for c in report.checks] == ["pass"] * 4
    with torch.no_grad():
        normalized.features[3].weight[2] *= 1.02
    failed = {
        c.name for c in vggnorm.verify_models(model, normalized, stats, batches=batches).checks if c.status == "fail"
    }
    assert {"activations", "fold", "means"} <= failed


def test_float64_model_measures_in_float64_and_pairs_are_batches(tiny_vgg):
    model = tiny_vgg().double()
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    stats = vggnorm.measure_means(model, [(x, torch.zeros(5))])
    h, expected = x, {}
    for i, m in enumerate(model.features):
        h = m(h)
        if isinstance(m, torch.nn.ReLU):
            expected[f"features.{i - 1}"] = h.mean(dim=(0, 2, 3))
    for name, mean in expected.items():
        torch.testing.assert_close(stats.layers[name].mean, mean, rtol=1e-12, atol=0)


def test_measure_folder_reads_images(tiny_vgg, photos):
    from vggnorm.io.data import ImageTransform

    stats = vggnorm.measure_folder(tiny_vgg(), photos, transform=ImageTransform(resize=40, crop=32))
    assert stats.num_images == 8 and stats.provenance.preprocess["crop"] == 32


def test_statistics_of_another_model_are_refused(tiny_vgg):
    stats = vggnorm.measure_means(tiny_vgg(), [torch.randn(2, 3, 16, 16)])
    with pytest.raises(StatsMismatchError):
        vggnorm.normalize_model(tiny_vgg(bn=False, cfg=(4, "M", 8)), stats)
