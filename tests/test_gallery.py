"""The gallery's verdicts and, for every accepted structure, the contract checked by our own oracle."""

from __future__ import annotations

import pytest
import torch

from contract import check_contract, images, one_thread
from gallery import GALLERY, build, model_and_images


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("entry", GALLERY, ids=lambda e: e.name)
def test_gallery(entry):
    model = build(entry)
    x = images(entry.size)
    outcome = check_contract(
        model,
        x,
        add_affine=entry.add_affine,
        unscaled=entry.unscaled,
        required_sites=entry.required_sites(model),
        streams=entry.expected_streams(),
        stream_scale=entry.stream_scale,
    )
    sites = [(s.conv, s.relu, outcome.calls.get(s.conv)) for s in outcome.sites]
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
    return model_and_images("leaky_relu")


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


# ---------------------------------------------------------------- per-call sites and streams: a stand-in API
#
# vggnorm's analysis of these structures is checked in the gallery above; here a hand-written stand-in for the
# public API (its analysis and folds written out for one model) shows what the oracle accepts and what it catches,
# independently of vggnorm's code.


class _Stats:
    def __init__(self, means: dict) -> None:
        self._means = means

    def means(self) -> dict:
        return dict(self._means)


def _stand_in(monkeypatch, sites, streams, fold, *, policy="geometric", means_of=None):
    """Replace analyze / measure_means / normalize_model / scales by a stand-in for ``sites`` and ``streams``
    (SimpleNamespace objects) that measures per call with the oracle's recorder, chooses divisors by ``policy``
    ("geometric", "last", or "own": each site its own mean, streams ignored) and folds them with ``fold``."""
    import copy
    from types import SimpleNamespace

    import vggnorm
    from contract import channel_means, dead_mask, recorded_forward

    topo = SimpleNamespace(all_sites=list(sites), refusals=[], streams=tuple(streams), left_unscaled=())

    def measure(model, batches, **kw):
        _, calls, _ = recorded_forward(model, batches[0])
        means = {s.conv: channel_means(calls[s.call].out) for s in sites}
        return _Stats(means_of(means) if means_of else means)

    def live_mean(m):
        return torch.where(dead_mask(m)[0], torch.ones_like(m), m)

    def divisors(stats):
        means = stats.means()
        out = {k: live_mean(m) for k, m in means.items()}
        for st in streams if policy != "own" else ():
            ms = [means[k] for k in st.sites]
            if policy == "last":
                d = live_mean(ms[-1])
            else:
                live = torch.stack([~dead_mask(m)[0] for m in ms])
                logs = torch.stack(
                    [torch.where(lv, m.clamp_min(1e-300).log(), 0.0) for m, lv in zip(ms, live, strict=True)]
                )
                d = torch.where(live.any(0), (logs.sum(0) / live.sum(0).clamp_min(1)).exp(), 1.0)
            out.update({k: d for k in st.sites})
        return out

    def normalize(model, stats, **kw):
        out = copy.deepcopy(model)
        with torch.no_grad():
            fold(out, divisors(stats))
        return out

    def scales(model, stats, **kw):
        d = divisors(stats)
        return {k: SimpleNamespace(scale=v, dead=v == 1) for k, v in d.items()}

    monkeypatch.setattr(vggnorm, "analyze", lambda model, **kw: topo)
    monkeypatch.setattr(vggnorm, "measure_means", measure)
    monkeypatch.setattr(vggnorm, "normalize_model", normalize)
    monkeypatch.setattr(vggnorm, "scales", scales)


def _site(key, call, relu, channels=4):
    from types import SimpleNamespace

    return SimpleNamespace(conv=key, relu=relu, call=call, out_channels=channels, kind="conv", activation="ReLU")


def _residual(monkeypatch, *, policy="geometric", report_stream=True, calls=(0, 1, 2)):
    """gallery's residual_identity: c0 -> r0 (call 0) -> h; c1 -> bn1 -> r1 (call 1) -> c2 -> bn2; + h -> r2
    (call 2) -> head. Stream {0, 2}: written by c0 and bn2, read by c1 and the head's Linear."""
    from types import SimpleNamespace

    sites = [_site("c0", calls[0], "r0"), _site("c1", calls[1], "r1"), _site("add", calls[2], "r2")]
    streams = [SimpleNamespace(sites=("c0", "add"), writers=("c0", "bn2"), readers=("c1", "head.2"))]

    def fold(m, d):
        m.c0.weight /= d["c0"][:, None, None, None]
        m.c0.bias /= d["c0"]
        m.c1.weight *= d["c0"][None, :, None, None]
        m.bn1.weight /= d["c1"]
        m.bn1.bias /= d["c1"]
        m.c2.weight *= d["c1"][None, :, None, None]
        m.bn2.weight /= d["add"]
        m.bn2.bias /= d["add"]
        m.head[2].weight *= d["add"][None, :]

    _stand_in(monkeypatch, sites, streams if report_stream else [], fold, policy=policy)
    return model_and_images("residual_identity")


@pytest.mark.parametrize("policy", ["geometric", "last"])
def test_oracle_accepts_a_correct_stream_normalization(monkeypatch, policy):
    model, x = _residual(monkeypatch, policy=policy)
    outcome = check_contract(model, x, required_sites="all", streams=((0, 2),), stream_scale=policy)
    assert outcome.accepted and not outcome.problems, outcome.describe()


def test_oracle_catches_another_stream_policy(monkeypatch):
    model, x = _residual(monkeypatch, policy="last")  # applies the last site's means; geometric was asked
    outcome = check_contract(model, x, streams=((0, 2),))
    assert outcome.categories() == ["means", "scales"], outcome.describe()


def test_oracle_catches_a_stream_member_with_its_own_divisor(monkeypatch):
    model, x = _residual(monkeypatch, policy="own")  # each member of the stream divided by its own mean
    outcome = check_contract(model, x, streams=((0, 2),))
    assert {"output", "stream"} <= set(outcome.categories()), outcome.describe()


def test_oracle_catches_an_unreported_stream(monkeypatch):
    model, x = _residual(monkeypatch, report_stream=False)  # the fold is per site: outputs change
    outcome = check_contract(model, x, streams=((0, 2),))
    assert {"output", "stream"} <= set(outcome.categories()), outcome.describe()


def test_oracle_catches_a_wrong_call_index(monkeypatch):
    model, x = _residual(monkeypatch, calls=(0, 2, 1))  # the stand-in measures calls 2 and 1 under c1 and add
    outcome = check_contract(model, x, streams=((0, 1),))
    assert "means" in outcome.categories() or "stats" in outcome.categories(), outcome.describe()
    assert outcome.accepted


def test_oracle_measures_every_call_of_a_module(monkeypatch):
    """One ReLU module at two sites: statistics that give both sites the module's last call (what one forward
    hook per module collects) must be caught."""
    entry = next(e for e in GALLERY if e.name == "act_module_called_twice")
    sites = [_site("c1", 0, "r"), _site("c2", 1, "r")]

    def fold(m, d):
        m.c1.weight /= d["c1"][:, None, None, None]
        m.c1.bias /= d["c1"]
        m.c2.weight *= d["c1"][None, :, None, None]
        m.c2.weight /= d["c2"][:, None, None, None]
        m.c2.bias /= d["c2"]
        m.head[2].weight *= d["c2"][None, :]

    _stand_in(monkeypatch, sites, [], fold)
    model, x = build(entry), images(entry.size)
    outcome = check_contract(model, x, required_sites="all")
    assert outcome.accepted and not outcome.problems, outcome.describe()  # the stand-in is right

    _stand_in(monkeypatch, sites, [], fold, means_of=lambda m: {"c1": m["c2"], "c2": m["c2"]})
    outcome = check_contract(model, x, required_sites="all")
    assert "stats" in outcome.categories(), outcome.describe()


def test_oracle_requires_every_activation_call_as_site(monkeypatch):
    entry = next(e for e in GALLERY if e.name == "act_module_called_twice")

    def fold(m, d):
        m.c1.weight /= d["c1"][:, None, None, None]
        m.c1.bias /= d["c1"]
        m.c2.weight *= d["c1"][None, :, None, None]

    _stand_in(monkeypatch, [_site("c1", 0, "r")], [], fold)  # the second call of r is not listed
    outcome = check_contract(build(entry), images(entry.size), required_sites="all")
    assert outcome.categories() == ["missing-site"], outcome.describe()


def test_sites_have_call_indices():
    """The contract's ``Site.call``: an int on every site (the oracle falls back to module hooks without it)."""
    import vggnorm

    for name in ("conv_bn_relu", "act_module_called_twice"):
        entry = next(e for e in GALLERY if e.name == name)
        topo = vggnorm.analyze(build(entry))
        assert [type(getattr(s, "call", None)) for s in topo.all_sites] == [int] * len(topo.all_sites), name
        assert hasattr(topo, "streams") and hasattr(topo, "left_unscaled")


def test_recorder_counts_every_spelling():
    """Our recorder sees each contract-counted call once (modules, every functional spelling) and nothing else."""
    from contract import recorded_forward

    entry = next(e for e in GALLERY if e.name == "functional_relu_family")
    _, calls, _ = recorded_forward(build(entry), images(entry.size))
    assert [c.activation for c in calls] == ["ReLU"] * 7
    entry = next(e for e in GALLERY if e.name == "functional_leaky_prelu")
    _, calls, _ = recorded_forward(build(entry), images(entry.size))
    assert [c.activation for c in calls] == ["LeakyReLU", "LeakyReLU", "PReLU", "PReLU"]
    entry = next(e for e in GALLERY if e.name == "resnet_basic_blocks")
    _, calls, of_module = recorded_forward(build(entry), images(entry.size))
    assert len(calls) == 7 and of_module["relu"] == [0] and of_module["layer2.0.relu"] == [3, 4]
    entry = next(e for e in GALLERY if e.name == "densenet_tiny")
    _, calls, _ = recorded_forward(build(entry), images(entry.size))
    assert len(calls) == 9


def test_a_gallery_model_is_built_afresh_and_alike_for_each_test(gallery_model):
    """The shared fixture: the same weights and images each time, and a model of the test's own (a test that
    folds it leaves the next one's alone)."""
    (a, x), (b, y) = gallery_model("residual_identity"), gallery_model("residual_identity")
    assert a is not b and torch.equal(x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with torch.no_grad():
        next(a.parameters()).mul_(2)
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    with pytest.raises(KeyError, match="no gallery entry 'nope'"):
        gallery_model("nope")
