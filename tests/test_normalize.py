"""The fold's invariants, on a tiny VGG look-alike in float64: F'_l == F_l / s_l, logits unchanged."""

import pytest
import torch

from vggnorm.analysis.topology import find_topology
from vggnorm.core.fold import DeadRule, fold_in_place, fold_state_dict, scales_from_means, scales_from_stats
from vggnorm.core.measure import ReluSums
from vggnorm.core.stats import LayerStats, Stats


def relu_outputs(model, topo, x):
    modules = dict(model.named_modules())
    out = {}
    hooks = [
        modules[s.relu].register_forward_hook(lambda m, a, y, n=s.conv: out.__setitem__(n, y.clone()))
        for s in topo.sites
    ]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return out, logits


def random_scales(topo, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s.conv: torch.rand(s.out_channels, generator=g, dtype=torch.float64) * 5 + 0.01 for s in topo.sites}


@pytest.mark.parametrize("bn", [False, True])
def test_relu_outputs_divided_and_logits_unchanged(tiny_vgg, bn):
    model = tiny_vgg(bn=bn).double()
    topo = find_topology(model)
    scales = random_scales(topo)
    sd = model.state_dict()
    folded = fold_state_dict(sd, scales, topo)
    normalized = tiny_vgg(bn=bn).double()
    normalized.load_state_dict(folded, strict=True)
    x = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    f, y = relu_outputs(model, topo, x)
    g, y2 = relu_outputs(normalized, topo, x)
    for name, s in scales.items():
        torch.testing.assert_close(g[name], f[name] / s.view(1, -1, 1, 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y2, y, rtol=1e-10, atol=1e-12)


def test_classifier_compensation_is_needed(tiny_vgg):
    """Without compensating the first Linear, the logits change: the test can fail."""
    model = tiny_vgg().double()
    topo = find_topology(model)
    folded = fold_state_dict(model.state_dict(), random_scales(topo), topo)
    folded["classifier.0.weight"] = model.state_dict()["classifier.0.weight"]
    broken = tiny_vgg().double()
    broken.load_state_dict(folded)
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    assert not torch.allclose(broken(x), model(x), rtol=1e-3)


@pytest.mark.parametrize("bn", [False, True])
def test_fold_in_place_gives_the_folds_numbers_in_the_same_tensors(tiny_vgg, bn):
    """apply's fold: every tensor bitwise fold_state_dict's, each rescaled weight written into the input's own
    tensor (not a second copy of the checkpoint), nothing counted as underflowed."""
    model = tiny_vgg(bn=bn)
    topo = find_topology(model)
    scales = random_scales(topo, seed=5)
    expected = fold_state_dict(model.state_dict(), scales, topo)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(v) for k, v in sd.items()}
    out, lost = fold_in_place(sd, scales, topo)
    assert list(out) == list(expected)
    for k, v in expected.items():
        assert torch.equal(out[k], v) and out[k].dtype == v.dtype, k
    original = model.state_dict()
    rescaled = {k for k, v in expected.items() if v.ndim > 1 and not torch.equal(v, original[k])}  # convs, Linears
    assert "classifier.0.weight" in rescaled
    assert set(lost) == rescaled and not any(lost.values())
    assert all(id(out[k]) == ids[k] for k in rescaled)


def test_fold_in_place_counts_underflows_and_leaves_shared_tensors_alone(tiny_vgg):
    """The values that underflow as a weight is overwritten are counted (the original is gone for
    check_representable); a weight whose storage another entry shares is folded into a new tensor."""
    model = tiny_vgg()
    topo = find_topology(model)
    # alternating: the second conv's weights are multiplied by 1e-30 / 1e30, below float32's range
    scales = {s.conv: torch.full((s.out_channels,), 1e-30 if i % 2 == 0 else 1e30) for i, s in enumerate(topo.sites)}
    original = model.state_dict()
    expected = fold_state_dict(original, scales, topo)
    sd = {k: v.clone() for k, v in original.items()}
    first = topo.sites[0].conv + ".weight"
    sd["shared.view"] = sd[first][:1]  # shares features.0.weight's storage
    out, lost = fold_in_place(sd, scales, topo)
    tiny = torch.finfo(torch.float32).tiny
    for k, n in lost.items():
        assert n == int(((original[k].abs() >= tiny) & (expected[k].abs() < tiny)).sum()), k
    assert any(lost.values())
    assert first not in lost and torch.equal(out[first], expected[first]) and torch.equal(sd[first], original[first])


def test_fold_matches_plain_formula_and_is_pure(tiny_vgg):
    model = tiny_vgg(bn=True)
    topo = find_topology(model)
    scales = random_scales(topo, seed=3)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    out = fold_state_dict(sd, scales, topo)
    for k in sd:  # inputs untouched, dtypes kept
        assert torch.equal(sd[k], before[k])
        assert out[k].dtype == sd[k].dtype
    prev = torch.ones(3, dtype=torch.float64)
    for site in topo.sites:
        s = scales[site.conv]
        w = sd[f"{site.conv}.weight"].double()
        for i in range(w.shape[0]):
            for k in range(w.shape[1]):
                expected = w[i, k] * prev[k]
                torch.testing.assert_close(
                    out[f"{site.conv}.weight"][i, k].double(), expected.float().double(), rtol=1e-6, atol=0
                )
        torch.testing.assert_close(
            out[f"{site.bn}.weight"].double(), sd[f"{site.bn}.weight"].double() / s, rtol=1e-6, atol=0
        )
        torch.testing.assert_close(
            out[f"{site.bn}.bias"].double(), sd[f"{site.bn}.bias"].double() / s, rtol=1e-6, atol=1e-12
        )
        assert torch.equal(out[f"{site.bn}.running_mean"], sd[f"{site.bn}.running_mean"])
        prev = s
    fc = sd["classifier.0.weight"].double()
    P = topo.positions_per_channel
    for j in range(fc.shape[1]):
        torch.testing.assert_close(
            out["classifier.0.weight"][:, j].double(), fc[:, j] * prev[j // P], rtol=1e-6, atol=1e-12
        )


def test_features_only_drops_the_classifier(tiny_vgg):
    model = tiny_vgg()
    topo = find_topology(model)
    out = fold_state_dict(model.state_dict(), random_scales(topo), topo, features_only=True)
    assert out and set(out) == {k for k in model.state_dict() if k.startswith("features.")}


def test_features_only_keeps_the_conv_sites_whatever_their_modules_are_named():
    """The backbone is what the analysis finds (the conv sites' convs and norms), not a module named features."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU()
    )
    model.add_module("head", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 12 * 12, 3)))
    model.eval()
    topo = find_topology(model)
    out = fold_state_dict(model.state_dict(), random_scales(topo), topo, features_only=True)
    assert set(out) == {k for k in model.state_dict() if not k.startswith("head.")}


def test_dead_filters_keep_scale_one():
    mean = torch.tensor([2.0, 0.0, 1e-9, 0.5], dtype=torch.float64)
    assert scales_from_means(mean, DeadRule(rel_eps=0, eps=1e-6)).tolist() == [2.0, 1.0, 1.0, 0.5]


def test_the_dead_rule_is_relative_to_the_layer():
    # median of the positive means: 1.0; threshold max(1e-6, 1e-3 * 1.0) = 1e-3
    mean = torch.tensor([1.0, 2.0, 1.5, 9e-4, 1.1e-3, 0.0, float("nan")], dtype=torch.float64)
    rule = DeadRule()
    assert rule.threshold(mean) == pytest.approx(1e-3)
    assert rule.live(mean).tolist() == [True, True, True, False, True, False, False]
    assert scales_from_means(mean, rule)[3] == 1.0
    # the same mean, 1.1e-3, is dead in a louder layer: the rule follows the layer's scale
    loud = torch.tensor([10.0, 20.0, 15.0, 1.1e-3], dtype=torch.float64)
    assert rule.threshold(loud) == pytest.approx(1e-2) and rule.live(loud).tolist() == [True, True, True, False]
    # the absolute floor stays: eps alone decides when rel_eps is 0
    assert DeadRule(rel_eps=0, eps=1.2).live(mean).tolist() == [False, True, True, False, False, False, False]


def test_normalized_means_are_one_and_dead_filters_listed(tiny_vgg):
    """End to end on the tiny model: measure, fold, re-measure: every live filter has mean 1."""
    model = tiny_vgg().double()
    topo = find_topology(model)
    with torch.no_grad():  # kill filter 2 of the first conv: never active on any input
        model.features[0].weight[2] = 0
        model.features[0].bias[2] = -1
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)

    def means(m):
        sums = ReluSums(topo.sites, torch.device("cpu"))
        with torch.no_grad(), sums.attached(m):
            m(x)
            sums.commit()
        return Stats(sums.layers(), 6)

    stats = means(model)
    scales = scales_from_stats(stats, topo)
    assert scales["features.0"].dead == [2]
    normalized = tiny_vgg().double()
    normalized.load_state_dict(fold_state_dict(model.state_dict(), {n: s.scale for n, s in scales.items()}, topo))
    for name, layer in means(normalized).layers.items():
        live = torch.ones(layer.sum.numel(), dtype=torch.bool)
        live[scales[name].dead] = False
        torch.testing.assert_close(
            layer.mean[live], torch.ones(int(live.sum()), dtype=torch.float64), rtol=1e-10, atol=0
        )
    assert means(normalized).layers["features.0"].mean[2] == 0


def test_stats_of_another_arch_are_refused(tiny_vgg):
    from vggnorm.errors import StatsMismatchError

    topo = find_topology(tiny_vgg())
    bad = Stats(
        {
            s.conv: LayerStats(s.conv, s.relu, s.bn, torch.ones(s.out_channels + 1, dtype=torch.float64), 1)
            for s in topo.sites
        },
        1,
    )
    with pytest.raises(StatsMismatchError, match="filters"):
        scales_from_stats(bad, topo)


@pytest.mark.parametrize("bn", [False, True])
def test_fc_relus_divided_and_logits_unchanged(tiny_vgg, bn):
    model = tiny_vgg(bn=bn).double()
    topo = find_topology(model)
    assert [s.conv for s in topo.fc_sites] == ["classifier.0", "classifier.3"]
    g = torch.Generator().manual_seed(5)
    scales = random_scales(topo)
    scales |= {s.conv: torch.rand(s.out_channels, generator=g, dtype=torch.float64) + 0.1 for s in topo.fc_sites}
    normalized = tiny_vgg(bn=bn).double()
    normalized.load_state_dict(fold_state_dict(model.state_dict(), scales, topo), strict=True)
    x = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    fc_topo = type(topo)(topo.fc_sites, None, None)
    f, y = relu_outputs(model, fc_topo, x)
    h, y2 = relu_outputs(normalized, fc_topo, x)
    for site in topo.fc_sites:
        torch.testing.assert_close(h[site.conv], f[site.conv] / scales[site.conv], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y2, y, rtol=1e-10, atol=1e-12)
