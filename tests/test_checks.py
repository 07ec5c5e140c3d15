"""Each invariant check of ``checks.py`` on its own: it passes what is right and fails what is not."""

import pytest
import torch

from vggnorm.analysis.topology import find_topology
from vggnorm.api import normalize_model
from vggnorm.core.checks import (
    FAIL,
    NOT_RUN,
    PASS,
    check_fold,
    check_function,
    check_means,
    reference_outputs,
)
from vggnorm.core.fold import LazyFold, fold_state_dict
from vggnorm.io.report import Report


@pytest.fixture
def pair(tiny_vgg):
    """A look-alike, random positive scales for its sites, and the fold of one by the other."""
    model = tiny_vgg()
    topo = find_topology(model)
    g = torch.Generator().manual_seed(3)
    scales = {s.conv: torch.rand(s.out_channels, generator=g, dtype=torch.float64) * 3 + 0.2 for s in topo.sites}
    normalized = tiny_vgg()
    normalized.load_state_dict(fold_state_dict(model.state_dict(), scales, topo))
    return model, normalized, scales


X = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))


def statuses(checks):
    return {c.name: c.status for c in checks}


def test_function_checks_pass_the_fold(pair):
    model, normalized, scales = pair
    assert statuses(check_function(model, normalized, scales, X)) == {"activations": PASS, "logits": PASS}


def test_function_checks_from_reference_outputs_as_from_the_model(pair):
    """apply runs the original before its fold overwrites the weights: the same checks, the same figures."""
    model, normalized, scales = pair
    direct = check_function(model, normalized, scales, X)
    reference = reference_outputs(model, scales, X)
    for p in model.parameters():  # what apply's in-place fold does to the original after its reference
        p.data.zero_()
    assert check_function(reference, normalized, scales, X) == direct
    with pytest.raises(ValueError, match="another input"):
        check_function(reference, normalized, scales, X + 1)
    fc = find_topology(model).fc_sites[0]
    with pytest.raises(ValueError, match="other scales"):  # taken without the fc site's scales
        check_function(reference, normalized, {**scales, fc.conv: torch.ones(fc.out_channels)}, X)


def test_activations_fail_with_other_scales(pair):
    model, normalized, scales = pair
    wrong = {n: s * 1.01 if n == "features.3" else s for n, s in scales.items()}
    checks = check_function(model, normalized, wrong, X)
    assert statuses(checks) == {"activations": FAIL, "logits": PASS}
    assert "features.3" in checks[0].detail


def test_logits_fail_when_the_classifier_is_not_compensated(pair, tiny_vgg):
    model, normalized, scales = pair
    normalized.classifier[0].weight.data = model.classifier[0].weight.data.clone()
    assert statuses(check_function(model, normalized, scales, X))["logits"] == FAIL


def test_function_checks_not_run_without_scales_or_classifier(pair):
    model, normalized, _ = pair
    checks = check_function(model, normalized, None, X, logits=False)
    assert statuses(checks) == {"activations": NOT_RUN, "logits": NOT_RUN}


def test_fold_check_on_a_lazy_fold_is_the_fold_checks(pair):
    """verify compares with normalize.LazyFold (each tensor computed as compared, a big weight by blocks of
    rows): the same keys, order and numbers as fold_state_dict, the same figures, passing or failing."""
    model, normalized, scales = pair
    topo = find_topology(model)
    lazy = LazyFold(model.state_dict(), scales, topo, block_rows=4)
    expected = fold_state_dict(model.state_dict(), scales, topo)
    assert list(lazy) == list(expected) and all(torch.equal(lazy[k], v) for k, v in expected.items())
    sd = normalized.state_dict()
    tampered = {**sd, "classifier.0.weight": sd["classifier.0.weight"].clone()}
    tampered["classifier.0.weight"][9, 3] *= 1.5  # in the third block of 4 rows
    for actual in (sd, tampered):
        assert check_fold(actual, lazy) == check_fold(actual, expected)
    assert check_fold(tampered, lazy).status == FAIL and "element [9, 3]" in check_fold(tampered, lazy).detail


def test_fold_check(pair):
    model, normalized, scales = pair
    expected = fold_state_dict(model.state_dict(), scales, find_topology(model))
    assert check_fold(normalized.state_dict(), expected).status == PASS
    changed = dict(normalized.state_dict())
    changed["features.5.bias"] = changed["features.5.bias"].clone()
    changed["features.5.bias"][0] *= 1.001
    check = check_fold(changed, expected)
    assert check.status == FAIL and "features.5.bias" in check.detail
    missing = {k: v for k, v in normalized.state_dict().items() if k != "features.0.bias"}
    assert check_fold(missing, expected).status == FAIL
    reshaped = {**normalized.state_dict(), "features.0.bias": torch.zeros(5)}
    assert check_fold(reshaped, expected).status == FAIL
    ints = {"n": torch.tensor([1, 2])}
    assert check_fold(ints, {"n": torch.tensor([1, 3])}).status == FAIL
    assert check_fold(ints, {"n": torch.tensor([1, 2])}).status == PASS


def test_means_check():
    ones = {"a": torch.ones(4, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    assert check_means(ones, {"a": [], "b": []}).status == PASS
    off = {**ones, "b": torch.tensor([1.0, 1.01, 1.0], dtype=torch.float64)}
    check = check_means(off, {"a": [], "b": []})
    assert check.status == FAIL and check.figure == pytest.approx(0.01) and "worst: b filter 1" in check.detail
    assert check_means(off, {"a": [], "b": [1]}).status == PASS  # a dead filter is excluded
    nan = {**ones, "a": torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64)}
    assert check_means(nan, {"a": [], "b": []}).status == FAIL
    all_dead = check_means(ones, {"a": [0, 1, 2, 3], "b": [0, 1, 2]})
    assert all_dead.status == FAIL and "every filter is dead" in all_dead.detail
    raw = {"a": torch.tensor([3.0, 0.0, 2.0], dtype=torch.float64)}  # an audit: the rule decides what is dead
    assert "NOT normalized" in check_means(raw, None).detail


def test_a_report_passes_only_when_every_check_that_ran_passed(pair):
    model, normalized, scales = pair
    checks = check_function(model, normalized, scales, X)
    assert Report("x", "a", checks).passed
    assert not Report("x", "a", [*checks, check_means({"a": torch.zeros(2)}, {"a": []})]).passed
    assert not Report("x", "a", check_function(model, normalized, None, X, logits=False)).passed  # nothing ran


def test_normalize_model_is_the_fold(tiny_vgg):
    from vggnorm.api import measure_means

    model = tiny_vgg(bn=True)
    stats = measure_means(model, [X])
    normalized = normalize_model(model, stats)
    scales = {n: s.scale for n, s in __import__("vggnorm").scales(model, stats).items()}
    assert (
        check_fold(normalized.state_dict(), fold_state_dict(model.state_dict(), scales, find_topology(model))).status
        == PASS
    )
