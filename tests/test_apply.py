"""vggnorm.commands.apply: its steps called directly (not through the CLI) on a tiny VGG look-alike, with the
statistics measured in memory (``vggnorm.measure_means``) and written to ``tmp_path``.

Each step is held to what its docstring and docs/reference/cli.md say it does: ``plan_apply`` refuses before a
weight is read, ``read_original`` and ``fold_and_export`` refuse weights the statistics were not measured on,
the fold equals one computed here in float64 from the statistics file's means, the self-check sees a corrupted
tensor, the provenance survives the ``.safetensors`` metadata, and a failed self-check writes nothing.
The command's options, messages and exit statuses are tested through the CLI in test_cli*.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lookalikes as L
import vggnorm
from vggnorm.commands import apply as A
from vggnorm.core.fold import DeadRule
from vggnorm.core.provenance import MeasurementRecord
from vggnorm.errors import (
    CheckFailedError,
    CheckpointError,
    InputError,
    OutputExistsError,
    StatsFileError,
    StatsMismatchError,
    UsageError,
)
from vggnorm.io.checkpoint import state_dict_sha256
from vggnorm.io.data import ImageTransform, Measurement
from vggnorm.io.models import import_user_model
from vggnorm.io.provenance import from_metadata, record_fields, to_metadata
from vggnorm.io.statsfile import read_stats, write_stats
from vggnorm.io.weights import random_state_dict
from vggnorm.options import Layout, StreamScale, Weighting

SIZE = 24  # the images measured, and the crop recorded: the self-check's probe is no larger
SILENT = ("features.3", 2)  # a filter made silent (zero weights, bias -1): its mean is 0, so it is dead


@dataclass(frozen=True)
class Case:
    arch: str
    weights: dict[str, torch.Tensor]  # what the checkpoint file holds (never folded: a copy of its own)
    ckpt: Path
    stats: Path
    other_weights: Path  # the same arch, another seed: another hash
    other_arch: Path  # tiny_bn's weights


def measured(model: torch.nn.Module, arch: str, weights: str, sha256: str, path: Path) -> Path:
    """``model``'s means on two seeded batches, recorded as compute-stats would record them, written to ``path``."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    stats = vggnorm.measure_means(model.eval(), batches)
    stats.provenance = MeasurementRecord(
        arch=arch,
        weights=weights,
        weights_sha256=sha256,
        preprocess=Measurement(ImageTransform(resize=SIZE, crop=SIZE)).as_attrs(),
    )
    write_stats(stats, path, force=False)
    return path


@pytest.fixture(scope="module")
def case(lookalike_archs, tmp_path_factory) -> Case:
    arch = lookalike_archs["tiny"]
    d = tmp_path_factory.mktemp("apply")
    sd = {k: v.clone() for k, v in random_state_dict(arch, 0).items()}
    conv, i = SILENT
    sd[f"{conv}.weight"][i] = 0.0
    sd[f"{conv}.bias"][i] = -1.0
    torch.save(sd, d / "tiny.pth")
    model = L.TinyVGG()
    model.load_state_dict(sd, strict=True)
    stats = measured(model, arch, str(d / "tiny.pth"), state_dict_sha256(sd), d / "stats.h5")
    torch.save(random_state_dict(arch, 1), d / "other.pth")
    torch.save(random_state_dict(lookalike_archs["tiny_bn"], 0), d / "tiny_bn.pth")
    return Case(arch, sd, d / "tiny.pth", stats, d / "other.pth", d / "tiny_bn.pth")


def plan(case: Case, out: Path, checkpoint: Path | None = None, stats: Path | None = None, **options) -> A.Plan:
    return A.plan_apply(str(checkpoint or case.ckpt), stats or case.stats, out, A.ApplyOptions(**options))


def garbage(tmp_path: Path) -> Path:
    """A "checkpoint" that no reader of weights accepts: a plan that succeeds on it read no weight."""
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    return path


def with_measurement(case: Case, path: Path, **changes) -> Path:
    """The case's statistics with their record changed, written to ``path``."""
    stats = read_stats(case.stats)
    stats.provenance = dataclasses.replace(stats.provenance, **changes)
    write_stats(stats, path, force=False)
    return path


# ---- ApplyOptions --------------------------------------------------------------------------------------------


def test_options_take_the_enums_strings_and_refuse_another_name():
    named = A.ApplyOptions(layout="gatys", weighting="class", stream_scale="last")
    assert (named.layout, named.weighting, named.stream_scale) == (Layout.GATYS, Weighting.CLASS, StreamScale.LAST)
    assert type(named.layout) is Layout and type(named.weighting) is Weighting
    assert type(named.stream_scale) is StreamScale
    assert A.ApplyOptions(layout=Layout.ADAIN).layout is Layout.ADAIN
    assert A.ApplyOptions() == A.ApplyOptions(layout="torchvision", weighting="image", stream_scale="geometric")
    for option, bad in (("layout", "gatsby"), ("weighting", "pixel"), ("stream_scale", "first")):
        with pytest.raises(UsageError, match=f"{option} '{bad}'"):
            A.ApplyOptions(**{option: bad})


# ---- plan_apply: refusals before any weight is read ------------------------------------------------------------


def test_a_plan_reads_no_weight(case, tmp_path):
    """The control for the refusals below: a plan on a file that is no checkpoint succeeds; reading it does not."""
    p = plan(case, tmp_path / "out.pth", checkpoint=garbage(tmp_path))
    assert p.arch == case.arch and p.output == tmp_path / "out.pth"
    assert p.outputs == (tmp_path / "out.pth", tmp_path / "out.report.json", tmp_path / "out.report.md")
    assert not list(tmp_path.glob("out*"))
    with pytest.raises(CheckpointError):
        A.read_original(p)


def test_a_shard_is_refused(case, tmp_path):
    shard = with_measurement(case, tmp_path / "shard.h5", shard="1/2")
    with pytest.raises(StatsFileError, match="shard 1/2 .* merge-stats"):
        plan(case, tmp_path / "out.pth", checkpoint=garbage(tmp_path), stats=shard)


def test_a_model_other_than_the_statistics_is_refused(case, tmp_path):
    other = import_user_model(L.spec("cat_net"))
    with pytest.raises(StatsMismatchError, match="--model names"):
        plan(case, tmp_path / "out.pth", checkpoint=garbage(tmp_path), model=other)
    assert plan(case, tmp_path / "out.pth", checkpoint=garbage(tmp_path), model=case.arch).arch == case.arch


@pytest.mark.parametrize("existing", ["out.pth", "out.report.json", "out.report.md"])
def test_an_existing_output_is_refused_without_force(case, tmp_path, existing):
    (tmp_path / existing).write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        plan(case, tmp_path / "out.pth", checkpoint=garbage(tmp_path))
    assert plan(case, tmp_path / "out.pth", checkpoint=garbage(tmp_path), force=True).options.force
    assert (tmp_path / existing).read_text() == "mine"


def test_the_checkpoint_itself_is_refused_as_the_output_even_with_force(case, tmp_path):
    ckpt = garbage(tmp_path)
    with pytest.raises(OutputExistsError, match="also an input"):
        plan(case, ckpt, checkpoint=ckpt, force=True)


@pytest.fixture(scope="module")
def cat_stats(tmp_path_factory) -> Path:
    """Statistics of a normalizable model that is not a chain of convs (branches, grouped convs)."""
    arch = import_user_model(L.spec("cat_net"))
    d = tmp_path_factory.mktemp("cat")
    return measured(L.cat_net(), arch, "cat.pth", "0" * 64, d / "cat.h5")


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"features_only": True}, InputError, "--features-only keeps the features of a chain of convs"),
        ({"layout": "gatys"}, InputError, "--layout gatys names the convs of a chain of convs"),
        ({"layout": "adain"}, StatsMismatchError, "writes VGG19's encoder"),
    ],
)
def test_a_layout_the_model_cannot_be_written_in_is_refused(case, cat_stats, tmp_path, options, error, says):
    with pytest.raises(error, match=says):
        plan(case, tmp_path / "out.pth", checkpoint=garbage(tmp_path), stats=cat_stats, **options)
    plan(case, tmp_path / "out.pth", checkpoint=garbage(tmp_path), stats=cat_stats)  # the default layout is fine


def test_the_gatys_layout_and_features_only_are_planned_for_a_chain(case, tmp_path):
    for options in ({"layout": "gatys"}, {"features_only": True}):
        assert plan(case, tmp_path / "out.pth", checkpoint=garbage(tmp_path), **options).topo.names


# ---- read_original, fold_and_export: the statistics' own weights ----------------------------------------------


def test_weights_of_another_arch_are_refused_when_read(case, tmp_path):
    with pytest.raises(StatsMismatchError, match="the statistics are for .* checkpoint"):
        A.read_original(plan(case, tmp_path / "out.pth", checkpoint=case.other_arch))


def test_other_weights_of_the_arch_are_refused_before_the_fold(case, tmp_path):
    """Another seed's weights: the same keys and shapes, another hash. Refused before a tensor is folded."""
    original = A.read_original(plan(case, tmp_path / "out.pth", checkpoint=case.other_weights))
    before = {k: v.clone() for k, v in original.base.items()}
    with pytest.raises(StatsMismatchError, match="measured with other weights"):
        A.fold_and_export(plan(case, tmp_path / "out.pth", checkpoint=case.other_weights), original)
    assert all(torch.equal(original.base[k], v) for k, v in before.items())


# ---- the fold and the self-check -------------------------------------------------------------------------------


def independent_fold(case: Case) -> dict[str, torch.Tensor]:
    """The fold in float64, from the statistics file's means (read with h5py): each conv's rows (output filters)
    and bias divided by its scale, its columns (input channels) multiplied by the previous conv's scale, and
    classifier.0's columns by the last conv's scale of the channel each reads (``POOL x POOL`` per channel). A
    scale is the filter's mean, 1 for a silent (dead) filter: the one silenced, and any the random weights made
    silent."""
    with h5py.File(case.stats) as f:
        order = json.loads(f.attrs["layer_order"])
        means = {n: torch.from_numpy(f[f"layers/{n}/mean"][()]) for n in order}
    assert order == ["features.0", "features.3", "features.5", "features.8"]
    expected = {k: v.double() for k, v in case.weights.items()}
    prev = torch.ones(3, dtype=torch.float64)
    for name in order:
        mean = means[name]
        live = mean[mean > 0]
        assert (mean >= 0).all() and (mean[SILENT[1]] == 0 or name != SILENT[0])
        # no mean near the dead rule's threshold, max(1e-6, 1e-3 x the layer's median positive mean) (docs):
        # the silent filters (mean 0) are the dead ones, the others live
        assert live.min() > 10 * max(1e-6, 1e-3 * float(live.median()))
        s = torch.where(mean > 0, mean, torch.ones_like(mean))
        expected[f"{name}.weight"] *= prev.view(1, -1, 1, 1) / s.view(-1, 1, 1, 1)
        expected[f"{name}.bias"] /= s
        prev = s
    expected["classifier.0.weight"] *= prev.repeat_interleave(L.POOL * L.POOL).view(1, -1)
    return expected


def folded(case: Case, out: Path, **options):
    p = plan(case, out, **options)
    original = A.read_original(p)
    reference = A.original_outputs(p, original)  # before the fold, which overwrites the weights it ran on
    return p, original, reference, A.fold_and_export(p, original)


def test_the_fold_equals_an_independent_float64_fold(case, tmp_path):
    _, original, _, exported = folded(case, tmp_path / "out.pth")
    expected = independent_fold(case)
    with h5py.File(case.stats) as f:
        silent = {
            n: torch.nonzero(torch.from_numpy(f[f"layers/{n}/mean"][()]) == 0).flatten().tolist() for n in f["layers"]
        }
    assert {n: s.dead for n, s in original.scales.items()} == silent and SILENT[1] in silent[SILENT[0]]
    assert set(exported) == set(expected)
    changed = {k for k in expected if not torch.equal(expected[k], case.weights[k].double())}
    assert changed == {f"features.{i}.{p}" for i in (0, 3, 5, 8) for p in ("weight", "bias")} | {"classifier.0.weight"}
    for key, value in expected.items():
        assert exported[key].dtype == torch.float32, key
        torch.testing.assert_close(exported[key].double(), value, rtol=2e-6, atol=0, msg=key)


def test_the_self_check_passes_the_fold_and_fails_a_corrupted_tensor(case, tmp_path):
    p, original, reference, exported = folded(case, tmp_path / "out.pth")
    checks = A.self_check(p, original, reference, exported)
    assert [(c.name, c.status) for c in checks] == [("activations", "pass"), ("logits", "pass"), ("loads", "pass")]
    # a conv's bias moved: its ReLU outputs, and through them the logits; the last Linear's: the logits alone
    for key, delta, fails in (
        ("features.5.bias", 1.0, {"activations", "logits"}),
        ("classifier.6.bias", 0.01, {"logits"}),
    ):
        corrupted = {**exported, key: exported[key] + delta}
        checks = A.self_check(p, original, reference, corrupted)
        assert {c.name for c in checks if c.status == "fail"} == fails, (
            key,
            [(c.name, c.figure, c.tolerance) for c in checks],
        )


def test_loads_fails_a_tensor_the_models_class_does_not_have(case, tmp_path):
    *_, exported = folded(case, tmp_path / "out.pth")
    assert A.check_loads(exported, case.arch, features_only=False).status == "pass"
    extra = A.check_loads({**exported, "classifier.7.weight": torch.zeros(1)}, case.arch, features_only=False)
    assert extra.status == "fail" and "classifier.7.weight" in extra.detail
    assert A.check_loads(exported, case.arch, features_only=True).status == "not run"


# ---- records and write_checkpoint -------------------------------------------------------------------------------


def test_the_provenance_round_trips_through_the_safetensors_metadata(case, tmp_path):
    rule = DeadRule(rel_eps=2e-3, eps=1e-7)
    p, original, _, exported = folded(case, tmp_path / "n.safetensors", rule=rule)
    provenance, inputs = A.records(p, original, ["a note"])
    tmp = tmp_path / "written"
    A.write_checkpoint(p, original, exported, tmp, to_metadata(provenance))
    with safe_open(str(tmp), "pt") as f:
        metadata = f.metadata()
    back = from_metadata(metadata, str(tmp))
    assert back == provenance
    assert (back.arch, back.layout, back.original, back.stats) == (
        case.arch,
        "torchvision",
        str(case.ckpt),
        str(case.stats),
    )
    assert back.original_sha256 == state_dict_sha256(case.weights)
    assert back.measurement == read_stats(case.stats).provenance
    assert back.normalization.rule == rule and back.normalization.stream_scale is None  # no residual stream
    assert back.normalization.preprocess == Measurement(ImageTransform(resize=SIZE, crop=SIZE)).as_attrs()
    fields = record_fields(provenance)
    assert {k: inputs[k] for k in fields} == fields  # the report's inputs hold the same record
    assert inputs["note"] == "a note" and inputs["stats_images"] == 4 and inputs["dead_rule"] == rule.describe()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_the_checkpoint_is_written_in_the_outputs_format_and_loads_back_equal(case, tmp_path, suffix):
    p, original, _, exported = folded(case, tmp_path / f"n{suffix}")
    tmp = tmp_path / "tmpfile"  # atomic_writes' temporary names do not end with the output's suffix
    A.write_checkpoint(p, original, exported, tmp, {"policy": "{}"})
    back = load_file(tmp) if suffix == ".safetensors" else torch.load(tmp, weights_only=True)
    assert set(back) == set(exported)
    for key, value in exported.items():
        assert torch.equal(back[key], value) and back[key].dtype == value.dtype, key


# ---- apply_stats ------------------------------------------------------------------------------------------------


def test_apply_writes_the_checkpoint_and_its_report(case, tmp_path):
    result = A.apply_stats(str(case.ckpt), case.stats, tmp_path / "out.pth")
    assert result.report.passed and result.figure is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth", "out.report.json", "out.report.md"]
    expected = independent_fold(case)
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(back[key].double(), value, rtol=2e-6, atol=0, msg=key)


def test_a_failed_self_check_leaves_nothing_behind(case, tmp_path, monkeypatch):
    """A fold gone wrong (a tensor corrupted after it): the real self-check fails it, and nothing is left: no
    checkpoint, no report, no temporary file."""
    fold = A.fold_and_export

    def corrupted(plan, original):
        exported = fold(plan, original)
        exported["features.5.bias"] += 0.01
        return exported

    monkeypatch.setattr(A, "fold_and_export", corrupted)
    out = tmp_path / "out" / "n.pth"
    out.parent.mkdir()
    with pytest.raises(CheckFailedError, match="nothing was written: activations"):
        A.apply_stats(str(case.ckpt), case.stats, out, A.ApplyOptions(model=case.arch))
    assert list(out.parent.iterdir()) == []
