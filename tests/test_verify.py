"""The proof verify and ``verify_models`` share (``core.checks.prove``), on small in-memory models: each check
fails when what it proves is false, and the inputs it is given decide which checks run.

The command around it (files, options, reports, exit statuses) is tested through the CLI in test_cli*.py.
"""

import dataclasses

import pytest
import torch

import vggnorm
from lookalikes import stream_net
from vggnorm.analysis.topology import find_topology
from vggnorm.core.checks import (
    DESCRIPTIONS,
    Images,
    Normalized,
    Original,
    Probe,
    Scales,
    failed,
    not_run,
    probe_input,
    prove,
)
from vggnorm.core.fold import scales_from_stats
from vggnorm.errors import DataError

NAMES = ["activations", "logits", "fold", "means"]


def _batches(n: int = 2, size: int = 24) -> list[torch.Tensor]:
    return [torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(n)]


@pytest.fixture
def case(tiny_vgg):
    """A model, its normalization, the scales it claims and the batches it was measured on."""
    model = tiny_vgg()
    batches = _batches()
    stats = vggnorm.measure_means(model, batches)
    topo = find_topology(model, add_affine=True)
    return model, vggnorm.normalize_model(model, stats), Scales(scales_from_stats(stats, topo), topo), batches


def _prove(model, normalized, scales, batches, *, stored=None, layout=None, mismatch=None, **images):
    subject = Normalized(
        normalized, find_topology(normalized, add_affine=True), normalized.state_dict(), stored=stored, layout=layout
    )
    original = Original(model, find_topology(model, add_affine=True), model.state_dict(), mismatch)
    means = Images([(x, None) for x in batches], **images) if batches is not None else not_run("means", "", "none")
    return prove(subject, original, scales, probe=Probe(probe_input(24), "probe"), images=means)


def _failed(proof) -> set[str]:
    return {c.name for c in proof.checks if c.status == "fail"}


def test_the_normalization_passes_every_check_with_its_description(case):
    proof = _prove(*case)
    assert [(c.name, c.status, c.description) for c in proof.checks] == [(n, "pass", DESCRIPTIONS[n]) for n in NAMES]
    assert proof.num_images == 8 and set(proof.means) == set(case[2].layers) and proof.dead is not None
    assert "worst layer" in proof.checks[0].detail and proof.checks[0].detail.endswith("; probe")


def test_a_changed_weight_fails_the_function_the_fold_and_the_means(case):
    model, normalized, scales, batches = case
    with torch.no_grad():
        normalized.features[3].weight[2] *= 1.02
    assert _failed(_prove(model, normalized, scales, batches)) == {"activations", "fold", "means"}


def test_the_fold_compares_the_stored_tensors_not_the_model(case):
    """A checkpoint whose file differs from the model run: only the fold can see it."""
    model, normalized, scales, batches = case
    stored = dict(normalized.state_dict())
    stored["features.5.bias"] = stored["features.5.bias"] * 1.01
    proof = _prove(model, normalized, scales, batches, stored=stored)
    assert _failed(proof) == {"fold"} and "features.5.bias" in proof.checks[2].detail


def test_the_fold_is_compared_in_the_stored_layout(case):
    model, normalized, scales, batches = case
    renamed = {f"net.{k}": v for k, v in normalized.state_dict().items()}
    relayout = lambda folded: {f"net.{k}": v for k, v in folded.items()}  # noqa: E731
    assert not _failed(_prove(model, normalized, scales, batches, stored=renamed, layout=relayout))
    assert _failed(_prove(model, normalized, scales, batches, stored=renamed)) == {"fold"}


def test_other_scales_than_the_checkpoints_fail_the_function_and_the_fold(case):
    model, normalized, scales, batches = case
    key = next(iter(scales.layers))
    layer = dataclasses.replace(scales.layers[key], scale=scales.layers[key].scale * 1.05)
    other = Scales({**scales.layers, key: layer}, scales.topology)
    proof = _prove(model, normalized, other, batches)
    assert _failed(proof) == {"activations", "fold"}, [c.detail for c in proof.checks]


def test_statistics_of_other_weights_fail_the_function_and_the_fold(case):
    model, normalized, scales, batches = case
    why = "the statistics were measured on other weights"
    proof = _prove(model, normalized, scales, batches, mismatch=lambda: why)
    by_name = {c.name: c for c in proof.checks}
    assert by_name["activations"] == failed("activations", why) and by_name["fold"] == failed("fold", why)
    assert by_name["logits"].status == "pass" and by_name["means"].status == "pass"
    assert not _failed(_prove(model, normalized, scales, batches, mismatch=lambda: None))


def test_the_inputs_decide_which_checks_run(case):
    model, normalized, scales, batches = case
    subject = Normalized(normalized, find_topology(normalized), normalized.state_dict())
    alone = prove(subject, None, None, probe=None, images=Images([(x, None) for x in batches]))
    assert [c.status for c in alone.checks] == ["not run"] * 3 + ["pass"] and alone.dead is None
    assert {c.detail for c in alone.checks[:3]} == {"needs --original"}
    original = Original(model, find_topology(model, add_affine=True), model.state_dict())
    without_scales = prove(subject, original, None, probe=Probe(probe_input(24), "p"), images=failed("means", "no"))
    assert [c.status for c in without_scales.checks] == ["not run", "pass", "not run", "fail"]
    assert without_scales.checks[3] == failed("means", "no") and without_scales.means is None
    with pytest.raises(ValueError, match="probe"):
        prove(subject, original, scales, probe=None, images=failed("means", "no"))


def test_no_images_is_an_error_not_a_figure(case):
    with pytest.raises(DataError, match="no images"):
        _prove(*case[:3], [])


def test_with_classes_the_class_balanced_means_are_checked(case):
    """Normalized on all images: their means are 1, the class-balanced means of unequal classes are not."""
    model, normalized, scales, batches = case
    first, second = batches[0], batches[1] * 3  # a class of brighter images
    stats = vggnorm.measure_means(model, [first, second[:1]])
    topo = scales.topology
    normalized = vggnorm.normalize_model(model, stats)
    claimed = Scales(scales_from_stats(stats, topo), topo)
    labelled = [(first, torch.zeros(4, dtype=torch.long)), (second[:1], torch.ones(1, dtype=torch.long))]
    subject = Normalized(normalized, find_topology(normalized), normalized.state_dict())
    original = Original(model, find_topology(model, add_affine=True), model.state_dict())

    def means(num_classes: int) -> str:
        proof = prove(
            subject, original, claimed, probe=Probe(probe_input(24), "p"), images=Images(labelled, num_classes)
        )
        return proof.checks[3].status

    assert means(0) == "pass" and means(2) == "fail"


def test_an_audit_leaves_the_residual_streams_out():
    model = stream_net().eval()
    subject = Normalized(model, find_topology(model), model.state_dict())
    batches = [(x, None) for x in _batches(1, 16)]
    proof = prove(subject, None, None, probe=None, images=Images(batches, note=lambda n: f"{n} images"))
    streams = {k for s in subject.topology.streams for k in s.sites}
    assert streams and streams <= set(proof.means)  # measured, reported, not held to 1
    assert f"4 images; {len(streams)} ReLUs on residual streams not audited" in proof.checks[3].detail
    assert not set(proof.checks[3].layers) & streams
