"""``verify``: check a normalized checkpoint against the four invariants verify checks.

``verify_checkpoint`` loads what it is given and runs the checks those inputs allow (``checks``):
(a) activations and (d) fold need the original and the statistics, (b) logits the original,
(c) means the images. A check whose inputs were not given is "not run"; one that cannot run as
asked is a failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggnorm.analysis.topology import Topology
from vggnorm.core.checks import FAIL, Check, check_fold, check_function, check_means, not_run, probe_input
from vggnorm.core.device import check_precision, memory_format, resolve_device
from vggnorm.core.fold import LayerScales, LazyFold, float32_bounds, fold_state_dict, scales_from_stats
from vggnorm.core.state import StateDict
from vggnorm.core.stats import LayerStats, Stats
from vggnorm.core.witness import activation_means
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
from vggnorm.io.policy import Policy, recorded_arch, report_base, resolve_policy
from vggnorm.io.report import Report, layer_summary, measured_summary, report_paths
from vggnorm.io.statsfile import read_stats
from vggnorm.io.weights import VERIFY, Weights, resolve_weights
from vggnorm.progress import Progress

FOLD_DESC = "the checkpoint equals fold(original, stats) recomputed"
ACTIVATIONS_DESC = "every conv's ReLU output equals the original's divided by its scales"
LOGITS_DESC = "logits equal the original's"
MEANS_DESC = "re-measured mean ReLU activation of every live filter is 1"


@dataclass(frozen=True)
class Normalized:
    """The checkpoint under test as read from disk, and in torchvision's layout."""

    path: Path
    raw: StateDict
    layout: str
    state_dict: StateDict
    arch: str  # for a Gatys layout: the plain VGG it loads into

    @classmethod
    def load(cls, path: Path, *, prefer: str | None = None) -> Normalized:
        raw = load_state_dict(path)
        check_floating(raw, str(path))
        check_finite(raw, str(path))
        sd = to_torchvision_layout(raw)
        foreign = peek(path)  # a Keras or MatConvNet file, read in torchvision's layout: its layout is its format
        layout = foreign[0] if foreign else detect_layout(raw)
        return cls(Path(path), raw, layout, sd, infer_arch(sd, prefer=prefer))

    @property
    def features_only(self) -> bool:
        return is_features_only(self.state_dict)


def verify_checkpoint(
    normalized_path: Path,
    *,
    original: str | None = None,
    stats_path: Path | None = None,
    data: Path | None = None,
    limit: int | None = None,
    rtol: float = DEFAULT_RTOL,
    means_tol: float = DEFAULT_MEANS_TOL,
    rel_eps: float | None = None,
    eps: float | None = None,
    resize: int | None = None,
    crop: int | None = None,
    preprocess: str | None = None,
    pooling: str | None = None,
    padding: str | None = None,
    include_classifier: bool | None = None,
    weighting: str | None = None,
    labels: str | None = None,
    stream_scale: str | None = None,
    precision: str = "fp32",
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    progress: bool = True,
    report: Path | None = None,
    junit_xml: Path | None = None,
    force: bool = False,
) -> Report:
    """Check the four invariants verify checks that the given inputs allow; write ``report`` if given.

    The means are measured under the statistics' policy (preprocessing, pooling, decoder) when
    ``stats_path`` is given, else under the one apply recorded with the checkpoint, else the
    weights' default; ``resize``, ``crop``, ``preprocess``, ``pooling`` override the last two. With
    ``data`` alone this audits any checkpoint. NORMALIZED may be in torchvision's, Gatys' or AdaIN's layout.
    ``include_classifier`` (default: as recorded) checks the fc ReLUs too. ``precision="fp64"``
    re-measures in float64. ``junit_xml`` also writes the checks as JUnit XML (``Report.to_junit``).
    """
    if original is None and data is None:
        raise UsageError(
            "nothing to verify: pass --original (with --stats) to check the fold, and/or --data to measure the means"
        )
    given = _inputs_of(normalized_path, stats_path, original)
    _check_outputs(report, junit_xml, given, figure=data is not None, force=force, data=data)
    stats = read_stats(stats_path) if stats_path is not None else None
    # two models may share their shapes
    prefer = canonical_arch(str(stats.attrs["arch"])) if stats is not None else recorded_arch(normalized_path)
    dev = resolve_device(device)
    check_precision(precision, dev)
    # the original first when its arch is known: its hash is computed while the other file loads
    weights = None
    if original is not None and (os.path.isfile(original) or prefer is not None):
        arch_hint = None if os.path.isfile(original) else prefer
        weights = resolve_weights(original, arch=arch_hint, prefer=prefer, background_hash=True, given=VERIFY)
    target = Normalized.load(normalized_path, prefer=prefer)
    if original is not None and weights is None:
        weights = resolve_weights(original, arch=target.arch, prefer=target.arch, background_hash=True, given=VERIFY)
    arch = _arch(target, stats, weights, original)
    options: dict[str, Any] = {
        "resize": resize,
        "crop": crop,
        "preprocess": preprocess,
        "pooling": pooling,
        "padding": padding,
    }
    policy = resolve_policy(
        normalized_path,
        stats,
        arch,
        rel_eps=rel_eps,
        eps=eps,
        include_classifier=include_classifier,
        weighting=weighting,
        labels=labels,
        stream_scale=stream_scale,
        **options,
    )
    if policy.include_classifier and target.features_only:
        raise InputError("--include-classifier: the checkpoint has no classifier")
    # --add-affine: recorded with the statistics; a normalized checkpoint holds the norms' new parameters
    add_affine = bool(stats.attrs.get("add_affine", False)) if stats is not None else False
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
    p = policy.preprocess
    model = as_run(target.arch, target.state_dict, p, dev, precision=precision)
    files = data_mod.find_images(data)[:limit] if data is not None else []
    inputs: dict[str, Any] = {
        "normalized": str(normalized_path),
        "layout": target.layout,
        "original": original,
        "stats": str(stats_path) if stats_path else None,
        "data": str(data) if data else None,
        "device": str(dev),
        "precision": precision,
        "policy": policy.describe(),
    }
    mismatch = None
    if weights is not None:
        expected_sha256 = str(stats.attrs.get("weights_sha256")) if stats is not None else None
        checks, mismatch = _against_original(
            target,
            model,
            weights,
            scales,
            files,
            p,
            arch=arch,
            device=dev,
            rtol=rtol,
            topo=topo,
            sha256=expected_sha256,
        )
        inputs["original_sha256"] = weights.sha256
    else:
        checks = [
            not_run(n, d, "needs --original")
            for n, d in (("activations", ACTIVATIONS_DESC), ("logits", LOGITS_DESC), ("fold", FOLD_DESC))
        ]
    measured = None
    if data is None:
        checks.append(not_run("means", MEANS_DESC, "needs --data"))
    else:
        means_check, measured = _means(
            target,
            model,
            arch,
            files,
            data,
            stats,
            scales if mismatch is None else None,
            policy,
            device=dev,
            tol=means_tol,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
        )
        checks.append(means_check)
        inputs["preprocess"] = p.as_attrs()
    result = _report(target, arch, checks, inputs, scales, measured, stats, policy, report=report, force=force)
    if junit_xml is not None:
        with atomic_write(junit_xml, force=force, inputs=given) as tmp:
            tmp.write_text(result.to_junit())
    return result


def as_run(
    arch: str, state_dict: StateDict, policy: data_mod.Preprocess, device: torch.device, *, precision: str = "fp32"
) -> nn.Module:
    """The checkpoint's model as its user runs it: its own class, the stored tensors, eval mode, contiguous
    inputs. Only a measurement policy asked for by name changes it (``--pooling avg``, ``--padding
    zeros|reflect``); ``precision="fp64"`` runs it in float64."""
    # torchvision's models in the device's faster memory format (the same function); a user model stays
    # contiguous, since its code may view activations
    fmt = torch.contiguous_format if is_user_model(arch) else memory_format(device)
    model = load_model(
        arch, state_dict, device=device, pooling=policy.pooling, padding=policy.padding, memory_format=fmt
    )
    return model.double() if precision == "fp64" else model


def _inputs_of(normalized: Path, stats: Path | None, original: str | None) -> list[str | os.PathLike[str]]:
    """The files verify reads, which it never writes over: apply's report beside NORMALIZED too (its policy)."""
    return [
        normalized,
        *([stats] if stats else []),
        *([original] if original and os.path.exists(original) else []),
        *(p for p in report_paths(report_base(normalized)) if p.exists()),
    ]


def _check_outputs(
    report: Path | None,
    junit_xml: Path | None,
    given: list[str | os.PathLike[str]],
    *,
    figure: bool,
    force: bool,
    data: Path | None = None,
) -> None:
    """Refuse, before any work, outputs that cannot or must not be written; none may land in ``data``."""
    outputs = [*report_paths(report)] if report is not None else []
    if report is not None and figure and have_matplotlib():
        outputs.append(report_paths(report)[1].with_suffix(".png"))
    outputs += [junit_xml] if junit_xml is not None else []
    if data is not None:
        data_mod.refuse_outputs_in(outputs, data, "--data")
    for p in outputs:
        check_writable(p, force=force, inputs=given)


def _means(
    target: Normalized,
    model: nn.Module,
    arch: str,
    files: list[Path],
    data: Path,
    stats: Stats | None,
    scales: dict[str, LayerScales] | None,
    policy: Policy,
    *,
    device: torch.device,
    tol: float,
    batch_size: int,
    workers: int | None,
    progress: bool,
) -> tuple[Check, Stats | None]:
    """(c): re-measure the means on ``files`` under ``policy``; the statistics' dead filters are excluded."""
    if policy.preprocess.decode == "gpu" and device.type != "cuda":
        # asked for (--data) but cannot be measured as the statistics were: a failure, never a pass
        why = (
            "cannot re-measure here: the statistics were measured with --decode gpu (nvJPEG, resized on the GPU), "
            "whose pixels differ slightly from the CPU decoder's; run verify on a CUDA device, which decodes the "
            "same way"
        )
        return Check("means", MEANS_DESC, FAIL, detail=why), None
    fc = policy.include_classifier
    labels = None
    if policy.weighting == "class":  # the classes of the images, as compute-stats --per-class read them
        source = policy.label_source
        labels = (
            label_mod.from_folders(data, files)
            if source == "folders"
            else label_mod.from_file(Path(source), data, files)
        )
    measured, skipped = _witness_means(
        model,
        _sites(target.arch, fc),
        None if target.features_only else topology(target.arch).activation_calls,
        files,
        policy.preprocess,
        device=device,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        labels=labels,
    )
    means = measured_means(measured, policy.weighting)
    note = f"{measured.num_images} images from {data}" + (f", {len(skipped)} skipped" if skipped else "")
    if stats is not None and data_mod.dataset_fingerprint(data, files) != stats.attrs.get("dataset_fingerprint"):
        note += "; these are not the calibration images of the statistics, so means near (not exactly) 1 are expected"
    if scales is None:  # an audit: a residual stream's ReLUs were promised their share of its scale, not 1
        streams = {k for stream in topology(target.arch).streams for k in stream.sites}
        if streams & set(means):
            means = {k: m for k, m in means.items() if k not in streams}
            note += (
                f"; {len(streams)} ReLUs on residual streams not audited (their means are the stream policy's, "
                "not 1: give --stats to check them)"
            )
    check = check_means(
        means,
        _by_normalized_path(arch, target.arch, scales, fc),
        tol=tol,
        rule=policy.rule,
        detail=note,
        scales=_by_normalized_path(arch, target.arch, scales, fc, "scale"),
        names=conv_names(target.arch),
        # from the checkpoint's own weights and the witnessed means: what float32 can hold in each filter
        bounds=float32_bounds(target.state_dict, topology(target.arch), measured.means()),
        expected=_by_normalized_path(arch, target.arch, scales, fc, "expected"),
    )
    return check, measured


def _witness_means(
    model: nn.Module,
    sites: list[Any],
    total: int | None,
    files: list[Path],
    preprocess: data_mod.Preprocess,
    *,
    device: torch.device,
    batch_size: int,
    workers: int | None,
    progress: bool,
    labels: label_mod.Labels | None,
) -> tuple[Stats, list[tuple[str, str]]]:
    """The means the witness reads (``witness.activation_means``: the model's whole forward, hooks of its
    own) over ``files``, as ``Stats`` for the report; and the files that could not be decoded."""
    dtype = next(model.parameters()).dtype
    loader = data_mod.make_loader(
        files,
        preprocess,
        batch_size=batch_size,
        workers=data_mod.default_workers() if workers is None else workers,
        device=device,
        dtype=torch.float64 if dtype == torch.float64 else torch.float32,  # fp64: the whole pipeline
    )
    convs = [p for p in model.parameters() if p.ndim == 4]
    fmt = torch.channels_last if convs and not convs[0].is_contiguous() else torch.contiguous_format
    skipped: list[tuple[str, str]] = []
    activations = {s.conv: s.call for s in sites}
    with Progress(total=len(files), unit="img", file=sys.stderr, disable=not progress, desc="verifying") as bar:

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
            for batch in loader:
                skipped.extend((str(files[i]), reason) for i, reason in batch.failures)
                bar.update(batch.num_files)
                if batch.images is not None:
                    classes = torch.tensor([labels.of_file[i] for i in batch.indices]) if labels else None
                    yield batch.images.to(device, dtype=dtype, memory_format=fmt), classes

        seen = activation_means(
            model, activations, batches(), num_classes=len(labels.classes) if labels else 0, total=total
        )
    if seen.num_images == 0:
        raise DataError("none of the images could be decoded")
    layers = {
        s.conv: LayerStats(
            s.conv,
            s.relu,
            None,
            seen.sums[s.conv],
            seen.counts[s.conv],
            seen.class_sums.get(s.conv),
            seen.class_counts.get(s.conv),
        )
        for s in sites
    }
    return Stats(layers, seen.num_images, skipped=skipped, classes=labels.classes if labels else []), skipped


def measured_means(measured: Stats, weighting: str) -> dict[str, torch.Tensor]:
    """The means verify checks: over all images, or class-balanced (``weighting="class"``)."""
    if weighting == "class":
        return {n: layer.balanced_mean for n, layer in measured.layers.items()}
    return measured.means()


def _arch(target: Normalized, stats: Stats | None, weights: Weights | None, original: str | None) -> str:
    """The arch the inputs agree on (a Gatys export of a ``_bn`` arch loads into its plain arch)."""
    if stats is not None:
        arch = canonical_arch(str(stats.attrs["arch"]))
    else:
        arch = weights.arch if weights is not None else target.arch
    if arch != target.arch and not (target.layout == "gatys" and arch.removesuffix("_bn") == target.arch):
        raise CheckpointError(f"{target.path} is a {target.arch}, but the statistics or --original are for {arch}")
    if weights is not None and weights.arch != arch:
        raise CheckpointError(f"--original {original} is a {weights.arch}, the statistics are for {arch}")
    return arch


def _report(
    target: Normalized,
    arch: str,
    checks: list[Check],
    inputs: dict[str, Any],
    scales: dict[str, LayerScales] | None,
    measured: Stats | None,
    stats: Stats | None,
    policy: Policy,
    *,
    report: Path | None,
    force: bool,
) -> Report:
    """The report; written (JSON, Markdown, and the figure of the re-measured means) when ``report`` is given."""
    dead = _by_normalized_path(arch, target.arch, scales, policy.include_classifier)
    per_layer = measured_summary(measured_means(measured, policy.weighting), dead, rule=policy.rule) if measured else []
    png = report_paths(report)[1].with_suffix(".png") if report is not None and measured and have_matplotlib() else None
    result = Report(
        str(target.path),
        arch,
        checks,
        inputs,
        layer_summary(scales) if scales else [],
        figure=png.name if png else None,
        measured=per_layer,
        names=conv_names(target.arch),
    )
    if report is None:
        return result
    with atomic_writes([*report_paths(report), *([png] if png else [])], force=force) as temps:
        result.write(temps[0], temps[1])
        if png is not None and measured is not None:
            means = measured_means(measured, policy.weighting)
            pairs = _pairs(arch, target.arch, policy.include_classifier)
            plot_means(
                {b: stats.layers[a].mean for a, b in pairs} if stats else None,
                means,
                dead or {n: torch.nonzero(~policy.rule.live(m)).flatten().tolist() for n, m in means.items()},
                temps[2],
                title=f"{arch}: {target.path.name}, re-measured on {measured.num_images} images",
                after_label="after (re-measured by verify)",
                names=conv_names(target.arch),
            )
    return result


def _sites(arch: str, include_classifier: bool) -> list[Any]:
    topo = topology(arch)
    return [*topo.sites, *(topo.fc_sites if include_classifier else ())]


def _pairs(arch: str, model_arch: str, include_classifier: bool) -> list[tuple[str, str]]:
    """(the statistics' path, the normalized model's path) of each site: they differ for a
    BN-folded Gatys export of a ``_bn`` arch."""
    sites = zip(_sites(arch, include_classifier), _sites(model_arch, include_classifier), strict=True)
    return [(a.conv, b.conv) for a, b in sites]


def _by_normalized_path(
    arch: str, model_arch: str, scales: dict[str, LayerScales] | None, include_classifier: bool, what: str = "dead"
) -> dict[str, Any] | None:
    """Each site's dead filters (or ``what="scale"``: scales) keyed by the normalized model's paths;
    None without statistics (the means check then applies the rule to the measured means)."""
    if scales is None:
        return None
    return {b: getattr(scales[a], what) for a, b in _pairs(arch, model_arch, include_classifier)}


def _against_original(
    target: Normalized,
    model: nn.Module,
    weights: Weights,
    scales: dict[str, LayerScales] | None,
    files: list[Path],
    policy: data_mod.Preprocess,
    *,
    arch: str,
    device: torch.device,
    rtol: float,
    topo: Topology,
    sha256: str | None,
) -> tuple[list[Check], str | None]:
    """(a) activations, (b) logits, (d) fold: the checks that compare with the original; and why the
    statistics do not belong to it (``sha256``: the hash they were measured with), if they do not.
    The hash is asked for after (a) and (b), so computing it overlaps with them."""
    orig_model = load_model(
        arch,
        weights.state_dict,
        device=device,
        pooling=policy.pooling,
        padding=policy.padding,
        add_affine=any(s.added_affine for s in topo.all_sites),
    )
    x, source = function_inputs(files, policy, arch)
    scale_t = {n: sc.scale for n, sc in scales.items()} if scales is not None else None
    logits = not target.features_only
    pair = (topology(arch, True), topology(target.arch, True))
    checks = check_function(
        orig_model, model, scale_t, x.to(device), rtol=rtol, logits=logits, inputs=source, topologies=pair
    )
    mismatch = None
    if sha256 is not None and sha256 != weights.sha256:
        mismatch = f"the statistics were measured on other weights than {weights.spec} (sha256 differs)"
    if scales is None:
        return [*checks, not_run("fold", FOLD_DESC, "needs --stats")], mismatch
    if mismatch is not None:
        return [
            *(c if c.name != "activations" else Check(c.name, c.description, FAIL, detail=mismatch) for c in checks),
            Check("fold", FOLD_DESC, FAIL, detail=mismatch),
        ], mismatch
    fold_args = (
        upcast_half(weights.state_dict),  # as apply folds half-precision weights: in float32
        {n: sc.scale for n, sc in scales.items()},
        topo,
    )
    expected: Mapping[str, torch.Tensor]
    if target.layout == "torchvision":  # compared as computed: no second copy of the checkpoint held
        expected = LazyFold(*fold_args, features_only=target.features_only)
    else:
        folded = fold_state_dict(*fold_args, features_only=target.features_only)
        expected = export_layout(folded, arch, target.layout, policy.as_attrs())
    return [*checks, check_fold(target.raw, expected, rtol=rtol)], None


def function_inputs(
    files: list[Path], preprocess: data_mod.Preprocess, arch: str, n: int = 2
) -> tuple[torch.Tensor, str]:
    """Up to ``n`` decodable images from ``files``, else a seeded random batch (``probe_input``, seed 0)
    of ``models.probe_size``."""
    images = []
    ds: Any = data_mod.ImageFiles(files, preprocess) if files else []  # none: no torchvision import
    for i in range(len(ds)):
        sample = ds[i]
        if sample.image is not None:
            images.append(sample.image)
        if len(images) == n:
            break
    if images:
        return torch.stack(images), f"{len(images)} images from --data"
    size = probe_size(arch, preprocess.crop)
    return probe_input(size), f"2 seeded random inputs (seed 0) at {size}x{size}"
