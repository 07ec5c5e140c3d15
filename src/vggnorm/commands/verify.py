"""``verify``: check a normalized checkpoint against the four invariants verify checks.

``verify_checkpoint`` reads what it is given, builds the models and hands them to the core's
``checks.prove`` (which ``api.verify_models`` calls too), then writes the reports. It runs the checks
those inputs allow: (a) activations and (d) fold need the original and the statistics, (b) logits the
original, (c) means the images. A check whose inputs were not given is "not run"; one that cannot run
as asked is a failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggnorm.analysis.topology import Topology
from vggnorm.core.checks import (
    DESCRIPTIONS,
    Check,
    Criteria,
    Images,
    Normalized,
    Original,
    Probe,
    Proof,
    Scales,
    failed,
    not_run,
    probe_input,
    prove,
    site_pairs,
)
from vggnorm.core.device import check_precision, memory_format, resolve_device
from vggnorm.core.fold import LayerScales, scales_from_stats
from vggnorm.core.state import StateDict
from vggnorm.core.stats import Stats
from vggnorm.defaults import DEFAULT_BATCH_SIZE, DEFAULT_MEANS_TOL, DEFAULT_RTOL
from vggnorm.errors import CheckpointError, DataError, InputError, UsageError
from vggnorm.io import data as data_mod
from vggnorm.io import labels as label_mod
from vggnorm.io.checkpoint import (
    atomic_write,
    atomic_writes,
    check_finite,
    check_floating,
    check_writable,
    load_state_dict,
    upcast_half,
)
from vggnorm.io.figures import have_matplotlib, plot_means
from vggnorm.io.formats import peek
from vggnorm.io.layouts import detect_layout, export_layout, to_torchvision_layout
from vggnorm.io.models import (
    ForwardPolicy,
    affine_keys,
    canonical_arch,
    checked_topology,
    conv_names,
    infer_arch,
    is_features_only,
    is_user_model,
    load_model,
    probe_size,
    topology,
)
from vggnorm.io.policy import Overrides, Policy, recorded_arch, report_base, resolve_policy
from vggnorm.io.report import Report, layer_summary, measured_summary, report_paths
from vggnorm.io.statsfile import read_stats
from vggnorm.io.weights import VERIFY, Weights, resolve_weights
from vggnorm.options import (
    Decoder,
    Layout,
    Precision,
    Weighting,
    parse,
)
from vggnorm.progress import Progress


@dataclass(frozen=True)
class Claim:
    """What to prove: NORMALIZED is the fold of ``original`` (WEIGHTS: a file, a torchvision weights name or random:SEED) by the scales of ``stats``."""

    normalized: Path
    original: str | None = None
    stats: Path | None = None

    def __post_init__(self) -> None:  # paths given as text, as a caller from Python gives them
        object.__setattr__(self, "normalized", Path(self.normalized))
        if self.stats is not None:
            object.__setattr__(self, "stats", Path(self.stats))
        if self.original is not None:
            object.__setattr__(self, "original", os.fspath(self.original))


@dataclass(frozen=True)
class Method:
    """How to prove it: the tolerances, where and in what precision, under which policy."""

    rtol: float = DEFAULT_RTOL
    means_tol: float = DEFAULT_MEANS_TOL
    device: str = "auto"
    precision: Precision = Precision.FP32  # fp64: the means are re-measured in float64
    policy: Overrides = Overrides()

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", parse(Precision, self.precision, "precision"))


@dataclass(frozen=True)
class Audit:
    """The images the means are re-measured on, and how they are read."""

    data: Path
    limit: int | None = None  # the first N images only
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None  # None: CPUs - 1
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))


@dataclass(frozen=True)
class Outputs:
    """What to write besides the returned ``Report``: ``report`` as PATH.json and PATH.md (with the
    re-measured means' figure), the checks as JUnit XML; ``force`` overwrites them."""

    report: Path | None = None
    junit_xml: Path | None = None
    force: bool = False

    def __post_init__(self) -> None:
        for name in ("report", "junit_xml"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint under test as read from disk, and in torchvision's layout."""

    path: Path
    raw: StateDict
    layout: Layout
    state_dict: StateDict
    arch: str  # for a Gatys layout: the plain VGG it loads into

    @classmethod
    def load(cls, path: Path, *, prefer: str | None = None) -> Checkpoint:
        raw = load_state_dict(path)
        check_floating(raw, str(path))
        check_finite(raw, str(path))
        sd = to_torchvision_layout(raw)
        foreign = peek(path)  # a Keras or MatConvNet file, read in torchvision's layout: its layout is its format
        layout = Layout(foreign[0]) if foreign else detect_layout(raw)
        return cls(Path(path), raw, layout, sd, infer_arch(sd, prefer=prefer))

    @property
    def features_only(self) -> bool:
        return is_features_only(self.state_dict)


@dataclass(frozen=True)
class _Read:
    """Verify's inputs, read and agreed on: the checkpoint, the statistics and the original, the policy, and
    the scales the statistics give (``topology``: the structure they and the fold are computed on)."""

    target: Checkpoint
    arch: str  # the statistics' and the original's
    stats: Stats | None
    weights: Weights | None
    policy: Policy
    topology: Topology
    scales: dict[str, LayerScales] | None
    device: torch.device


def verify_checkpoint(
    claim: Claim, method: Method = Method(), audit: Audit | None = None, outputs: Outputs = Outputs()
) -> Report:
    """Check the four invariants verify checks that the given inputs allow; write the ``outputs`` asked for.

    The means are measured under the statistics' policy (preprocessing, pooling, decoder) when
    ``claim.stats`` is given, else under the one apply recorded with the checkpoint, else the
    weights' default; ``method.policy`` overrides the last two. With an ``audit`` alone this audits any
    checkpoint. NORMALIZED may be in torchvision's, Gatys' or AdaIN's layout. ``Overrides.include_classifier``
    (default: as recorded) checks the fc ReLUs too. ``Method.precision="fp64"`` re-measures in float64.
    ``Outputs.junit_xml`` also writes the checks as JUnit XML (``Report.to_junit``).
    """
    if claim.original is None and audit is None:
        raise UsageError(
            "nothing to verify: pass --original (with --stats) to check the fold, and/or --data to measure the means"
        )
    given = _inputs_of(claim)
    _check_outputs(outputs, given, audit)
    read = _read(claim, method)
    p = read.policy.measurement
    model = as_run(read.target.arch, read.target.state_dict, p.forward, read.device, precision=method.precision)
    files = data_mod.find_images(audit.data)[: audit.limit] if audit is not None else []
    original = _original(read) if read.weights is not None else None
    proof = prove(
        _subject(read, model),
        original,
        Scales(read.scales, read.topology) if read.scales is not None else None,
        probe=function_inputs(files, p, read.arch) if original is not None else None,
        images=_images(read, model, audit, files),
        criteria=Criteria(method.rtol, method.means_tol, read.policy.rule),
    )
    png = _figure(outputs, proof)
    result = _report(read, proof, _described(claim, method, audit, read), png)
    _write(result, read, proof, outputs, png, given)
    return result


def as_run(
    arch: str,
    state_dict: StateDict,
    forward: ForwardPolicy,
    device: torch.device,
    *,
    precision: Precision = Precision.FP32,
) -> nn.Module:
    """The checkpoint's model as its user runs it: its own class, the stored tensors, eval mode, contiguous
    inputs. Only a measurement policy asked for by name changes it (``--pooling avg``, ``--padding
    zeros|reflect``); ``precision="fp64"`` runs it in float64."""
    # torchvision's models in the device's faster memory format (the same function); a user model stays
    # contiguous, since its code may view activations
    fmt = torch.contiguous_format if is_user_model(arch) else memory_format(device)
    model = load_model(arch, state_dict, device=device, forward=forward, memory_format=fmt)
    return model.double() if precision == Precision.FP64 else model


def _inputs_of(claim: Claim) -> list[str | os.PathLike[str]]:
    """The files verify reads, which it never writes over: apply's report beside NORMALIZED too (its policy)."""
    original = claim.original
    return [
        claim.normalized,
        *([claim.stats] if claim.stats else []),
        *([original] if original and os.path.exists(original) else []),
        *(p for p in report_paths(report_base(claim.normalized)) if p.exists()),
    ]


def _check_outputs(outputs: Outputs, given: list[str | os.PathLike[str]], audit: Audit | None) -> None:
    """Refuse, before any work, outputs that cannot or must not be written; none may land in the data."""
    report = outputs.report
    paths = [*report_paths(report)] if report is not None else []
    if report is not None and audit is not None and have_matplotlib():
        paths.append(report_paths(report)[1].with_suffix(".png"))
    options = ["--report"] * len(paths)
    if outputs.junit_xml is not None:
        paths.append(outputs.junit_xml)
        options.append("--junit-xml")
    if audit is not None:
        data_mod.refuse_outputs_in(paths, audit.data, "--data")
    for p, option in zip(paths, options, strict=True):
        check_writable(p, force=outputs.force, inputs=given, option=option)


def _read(claim: Claim, method: Method) -> _Read:
    """Read the statistics, the original and the checkpoint (the original first when its arch is known: its
    hash is computed while the other file loads), agree on their arch, and resolve the policy (``_policy``)."""
    stats = read_stats(claim.stats) if claim.stats is not None else None
    # two models may share their shapes
    prefer = canonical_arch(stats.provenance.arch) if stats is not None else recorded_arch(claim.normalized)
    dev = resolve_device(method.device)
    check_precision(method.precision, dev)
    original = claim.original
    weights = None
    if original is not None and (os.path.isfile(original) or prefer is not None):
        arch_hint = None if os.path.isfile(original) else prefer
        weights = resolve_weights(original, arch=arch_hint, prefer=prefer, background_hash=True, given=VERIFY)
    target = Checkpoint.load(claim.normalized, prefer=prefer)
    if original is not None and weights is None:
        weights = resolve_weights(original, arch=target.arch, prefer=target.arch, background_hash=True, given=VERIFY)
    arch = _arch(target, stats, weights, original)
    policy, topo, scales = _policy(claim.normalized, method.policy, target, stats, arch)
    return _Read(target, arch, stats, weights, policy, topo, scales, dev)


def _policy(
    normalized: Path, o: Overrides, target: Checkpoint, stats: Stats | None, arch: str
) -> tuple[Policy, Topology, dict[str, LayerScales] | None]:
    """The policy verify measures under (``io.policy.resolve_policy``), the structure the statistics' scales
    and the fold are computed on, and those scales."""
    policy = resolve_policy(normalized, stats, arch, o)
    if policy.include_classifier and target.features_only:
        raise InputError("--include-classifier: the checkpoint has no classifier")
    # --add-affine: recorded with the statistics; a normalized checkpoint holds the norms' new parameters
    add_affine = stats.provenance.add_affine if stats is not None else False
    add_affine = add_affine or any(k in target.state_dict for k in affine_keys(target.arch))
    topo = checked_topology(arch, add_affine)
    scales = None
    if stats is not None:
        scales = scales_from_stats(
            stats,
            topo,
            rule=policy.rule,
            include_classifier=policy.include_classifier,
            weighting=policy.weighting,
            stream_scale=policy.stream_scale,
        )
    return policy, topo, scales


def _arch(target: Checkpoint, stats: Stats | None, weights: Weights | None, original: str | None) -> str:
    """The arch the inputs agree on (a Gatys export of a ``_bn`` arch loads into its plain arch)."""
    if stats is not None:
        arch = canonical_arch(stats.provenance.arch)
    else:
        arch = weights.arch if weights is not None else target.arch
    if arch != target.arch and not (target.layout == "gatys" and arch.removesuffix("_bn") == target.arch):
        raise CheckpointError(f"{target.path} is a {target.arch}, but the statistics or --original are for {arch}")
    if weights is not None and weights.arch != arch:
        raise CheckpointError(f"--original {original} is a {weights.arch}, the statistics are for {arch}")
    return arch


def _subject(read: _Read, model: nn.Module) -> Normalized:
    """The checkpoint as the core proves it: ``model`` runs it, its file's tensors are compared with the fold."""
    target = read.target
    return Normalized(
        model,
        topology(target.arch, True),
        target.state_dict,
        read.policy.include_classifier,
        target.features_only,
        stored=target.raw,
        layout=_relayout(read),
    )


def _relayout(read: _Read) -> Callable[[StateDict], StateDict] | None:
    """The fold (in torchvision's layout) as the checkpoint lays it out; None for torchvision's own, which is
    then compared as it is computed: no second copy of the checkpoint held."""
    if read.target.layout == Layout.TORCHVISION:
        return None
    measurement = read.policy.measurement
    return lambda folded: export_layout(folded, read.arch, read.target.layout, measurement)


def _original(read: _Read) -> Original:
    """The original as (a), (b) and (d) use it; the statistics must have been measured on it (their hash)."""
    weights = read.weights
    assert weights is not None
    model = load_model(
        read.arch,
        weights.state_dict,
        device=read.device,
        forward=read.policy.measurement.forward,
        add_affine=any(s.added_affine for s in read.topology.all_sites),
    )
    # None: no statistics; "": statistics that do not say which weights they were measured on, which
    # cannot show they are the original's (apply refuses them too)
    expected_sha256 = read.stats.provenance.weights_sha256 if read.stats is not None else None

    def mismatch() -> str | None:
        if expected_sha256 == "":
            return (
                f"the statistics do not record which weights they were measured on (no weights_sha256), so they "
                f"cannot be shown to be {weights.spec}'s: measure them again with compute-stats"
            )
        if expected_sha256 is not None and expected_sha256 != weights.sha256:
            return f"the statistics were measured on other weights than {weights.spec} (sha256 differs)"
        return None

    # as apply folds half-precision weights: in float32
    return Original(model, topology(read.arch, True), upcast_half(weights.state_dict), mismatch)


def function_inputs(files: list[Path], measurement: data_mod.Measurement, arch: str, n: int = 2) -> Probe:
    """Up to ``n`` decodable images from ``files``, else a seeded random batch (``probe_input``, seed 0)
    of ``models.probe_size``."""
    images = []
    # none: no torchvision import
    ds: Any = data_mod.ImageFiles(files, measurement.transform, measurement.convention) if files else []
    for i in range(len(ds)):
        sample = ds[i]
        if sample.image is not None:
            images.append(sample.image)
        if len(images) == n:
            break
    if images:
        return Probe(torch.stack(images), f"{len(images)} images from --data")
    size = probe_size(arch, measurement.transform.crop)
    return Probe(probe_input(size), f"2 seeded random inputs (seed 0) at {size}x{size}")


def _images(read: _Read, model: nn.Module, audit: Audit | None, files: list[Path]) -> Images | Check:
    """(c)'s images: the batches the witness reads, and a note on them; or the means check where there are
    none, or where they cannot be measured as the statistics were."""
    if audit is None:
        return not_run("means", DESCRIPTIONS["means"], "needs --data")
    policy = read.policy
    if policy.measurement.decoder == Decoder.GPU and read.device.type != "cuda":
        # asked for (--data) but cannot be measured as the statistics were: a failure, never a pass
        return failed(
            "means",
            "cannot re-measure here: the statistics were measured with --decode gpu (nvJPEG, resized on the GPU), "
            "whose pixels differ slightly from the CPU decoder's; run verify on a CUDA device, which decodes the "
            "same way",
        )
    labels = None
    if policy.weighting == Weighting.CLASS:  # the classes of the images, as compute-stats --per-class read them
        source = policy.label_source
        labels = (
            label_mod.from_folders(audit.data, files)
            if source == "folders"
            else label_mod.from_file(Path(source), audit.data, files)
        )
    skipped: list[tuple[str, str]] = []
    stats = read.stats

    def note(num_images: int) -> str:
        text = f"{num_images} images from {audit.data}" + (f", {len(skipped)} skipped" if skipped else "")
        if (
            stats is not None
            and data_mod.dataset_fingerprint(audit.data, files) != stats.provenance.dataset_fingerprint
        ):
            text += (
                "; these are not the calibration images of the statistics, so means near (not exactly) 1 are expected"
            )
        return text

    batches = _batches(model, files, policy.measurement, audit, labels, skipped)
    return Images(batches, len(labels.classes) if labels else 0, note)


def _batches(
    model: nn.Module,
    files: list[Path],
    measurement: data_mod.Measurement,
    audit: Audit,
    labels: label_mod.Labels | None,
    skipped: list[tuple[str, str]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``files`` decoded as ``measurement`` says, on ``model``'s device in its dtype and memory format, with
    their classes; the files that cannot be decoded are added to ``skipped``."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    loader = data_mod.make_loader(
        files,
        measurement.transform,
        measurement.convention,
        decoder=measurement.decoder,
        batch_size=audit.batch_size,
        workers=data_mod.default_workers() if audit.workers is None else audit.workers,
        device=device,
        dtype=torch.float64 if dtype == torch.float64 else torch.float32,  # fp64: the whole pipeline
    )
    convs = [p for p in model.parameters() if p.ndim == 4]
    fmt = torch.channels_last if convs and not convs[0].is_contiguous() else torch.contiguous_format
    decoded = 0
    with Progress(total=len(files), unit="img", file=sys.stderr, disable=not audit.progress, desc="verifying") as bar:
        for batch in loader:
            skipped.extend((str(files[i]), reason) for i, reason in batch.failures)
            bar.update(batch.num_files)
            if batch.images is not None:
                decoded += batch.images.shape[0]
                classes = torch.tensor([labels.of_file[i] for i in batch.indices]) if labels else None
                yield batch.images.to(device, dtype=dtype, memory_format=fmt), classes
    if decoded == 0:
        raise DataError("none of the images could be decoded")


def _described(claim: Claim, method: Method, audit: Audit | None, read: _Read) -> dict[str, Any]:
    """What the report says verify was given, and how it measured."""
    inputs: dict[str, Any] = {
        "normalized": str(claim.normalized),
        "layout": read.target.layout,
        "original": claim.original,
        "stats": str(claim.stats) if claim.stats else None,
        "data": str(audit.data) if audit else None,
        "device": str(read.device),
        "precision": method.precision,
        "policy": read.policy.describe(),
    }
    if read.weights is not None:
        inputs["original_sha256"] = read.weights.sha256
    if audit is not None:
        inputs["preprocess"] = read.policy.measurement.as_attrs()
    return inputs


def _figure(outputs: Outputs, proof: Proof) -> Path | None:
    """Where the figure of the re-measured means goes: beside the report, when there are means and matplotlib."""
    if outputs.report is None or proof.means is None or not have_matplotlib():
        return None
    return report_paths(outputs.report)[1].with_suffix(".png")


def _report(read: _Read, proof: Proof, inputs: dict[str, Any], png: Path | None) -> Report:
    """The report of ``proof``; ``png``: the figure written beside it."""
    return Report(
        str(read.target.path),
        read.arch,
        proof.checks,
        inputs,
        layer_summary(read.scales) if read.scales else [],
        figure=png.name if png else None,
        measured=measured_summary(proof.means, proof.dead, rule=read.policy.rule) if proof.means is not None else [],
        names=conv_names(read.target.arch),
    )


def _write(
    result: Report, read: _Read, proof: Proof, outputs: Outputs, png: Path | None, given: list[str | os.PathLike[str]]
) -> None:
    """Write the report (JSON, Markdown, and the figure ``png`` of the re-measured means) and the JUnit XML
    asked for."""
    if outputs.report is not None:
        paths = [*report_paths(outputs.report), *([png] if png else [])]
        with atomic_writes(paths, force=outputs.force, option="--report") as temps:
            result.write(temps[0], temps[1])
            if png is not None and proof.means is not None:
                _plot(read, proof, temps[2])
    if outputs.junit_xml is not None:
        with atomic_write(outputs.junit_xml, force=outputs.force, inputs=given, option="--junit-xml") as tmp:
            tmp.write_text(result.to_junit())


def _plot(read: _Read, proof: Proof, path: Path) -> None:
    """The re-measured means against the statistics' (keyed by the normalized model's paths), to ``path``."""
    assert proof.means is not None
    target, arch, stats, rule = read.target, read.arch, read.stats, read.policy.rule
    pairs = site_pairs(topology(arch), topology(target.arch), read.policy.include_classifier)
    plot_means(
        {b: stats.layers[a].mean for a, b in pairs} if stats else None,
        proof.means,
        proof.dead or {n: torch.nonzero(~rule.live(m)).flatten().tolist() for n, m in proof.means.items()},
        path,
        title=f"{arch}: {target.path.name}, re-measured on {proof.num_images} images",
        after_label="after (re-measured by verify)",
        names=conv_names(target.arch),
    )
