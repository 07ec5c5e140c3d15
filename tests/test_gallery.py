"""The gallery's verdicts and, for every accepted structure, the contract checked by our own oracle."""

from __future__ import annotations

import pytest
import torch

from contract import check_contract, images, one_thread
from gallery import GALLERY, build


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("entry", GALLERY, ids=lambda e: e.name)
def test_gallery(entry):
    model = build(entry)
    x = images(entry.size)
    outcome = check_contract(
        model, x, add_affine=entry.add_affine, unscaled=entry.unscaled, required_sites=entry.required_sites(model)
    )
    sites = [(s.conv, s.bn, s.relu) for s in outcome.sites]
    if entry.verdict == "exact":
        assert outcome.accepted, f"expected exact, but {outcome.describe()}"
    elif entry.verdict == "refused":
        assert not outcome.accepted, f"expected a refusal, but {outcome.describe()}; sites {sites}"
        # refused for what the model does, not because the analysis could not follow it
        assert not outcome.refusal.startswith("<trace>"), f"refused only because tracing failed: {outcome.refusal}"
    assert not outcome.problems, f"{outcome.describe()}; sites {sites}"


def test_gallery_is_large_and_names_unique():
    names = [e.name for e in GALLERY]
    assert len(names) == len(set(names))
    assert len(names) >= 40
    assert {e.verdict for e in GALLERY} == {"exact", "refused", "either"}


def test_include_classifier_on_a_model_without_linear_sites():
    """measure_means(include_classifier=True) then normalize_model(include_classifier=True) on a conv-only
    model: the flag means "also the Linear sites", and there are none; the round trip must work."""
    import vggnorm

    entry = next(e for e in GALLERY if e.name == "conv_bn_relu")
    model, x = build(entry), images(entry.size)
    stats = vggnorm.measure_means(model, [x], include_classifier=True)
    normalized = vggnorm.normalize_model(model, stats, include_classifier=True)
    assert (normalized(x) - model(x)).abs().max() <= 1e-10 * model(x).abs().max()


# ---------------------------------------------------------------- the oracle catches what it must


def _small():
    entry = next(e for e in GALLERY if e.name == "leaky_relu")
    return build(entry), images(entry.size)


def test_oracle_catches_a_normalization_that_does_nothing(monkeypatch):
    import copy

    import vggnorm

    model, x = _small()
    monkeypatch.setattr(vggnorm, "normalize_model", lambda m, stats, **kw: copy.deepcopy(m))
    outcome = check_contract(model, x)
    assert outcome.accepted and outcome.categories() == ["means"], outcome.describe()


def test_oracle_catches_an_uncompensated_scale(monkeypatch):
    import vggnorm

    model, x = _small()
    real = vggnorm.normalize_model

    def skewed(m, stats, **kw):
        out = real(m, stats, **kw)
        with torch.no_grad():
            out[2].weight[0] *= 1.5  # the compensating conv reads one channel wrongly
        return out

    monkeypatch.setattr(vggnorm, "normalize_model", skewed)
    outcome = check_contract(model, x)
    assert "output" in outcome.categories() and "means" in outcome.categories(), outcome.describe()


def test_oracle_catches_statistics_of_another_forward(monkeypatch):
    import vggnorm

    model, x = _small()
    real = vggnorm.measure_means
    monkeypatch.setattr(vggnorm, "measure_means", lambda m, batches, **kw: real(m, [b * 1.1 for b in batches], **kw))
    outcome = check_contract(model, x)
    assert "stats" in outcome.categories(), outcome.describe()


def test_oracle_checks_unscaled_sites():
    model, x = _small()
    # a site claimed to reach the output must keep its means; vggnorm (rightly) scaled this one
    outcome = check_contract(model, x, unscaled=("1",))
    assert outcome.categories() == ["means"], outcome.describe()
