"""``apply``: the I/O shell around the fold. Load the checkpoint and statistics, check they belong
together, run the original on the self-check's probe, fold (``core.fold.fold_in_place``: into the loaded
tensors), self-check, save, and write the report."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from vggnorm.analysis.topology import Topology, with_affine
from vggnorm.core.checks import Check, check_function, not_run, probe_input, reference_outputs
from vggnorm.core.fold import (
    DeadRule,
    LayerScales,
    float32_bounds,
    fold_in_place,
    fold_state_dict,
    scales_from_stats,
)
from vggnorm.core.stats import Stats
from vggnorm.defaults import DEFAULT_MEANS_TOL
from vggnorm.errors import (
    CheckFailedError,
    InputError,
    InvalidValuesError,
    OutputExistsError,
    StatsFileError,
    StatsMismatchError,
    WriteError,
)
from vggnorm.io.checkpoint import (
    atomic_writes,
    check_finite,
    check_representable,
    check_writable,
    half_dtypes,
    state_dict_bytes,
    upcast_half,
    write_state_dict,
)
from vggnorm.io.data import Measurement
from vggnorm.io.figures import have_matplotlib, plot_means
from vggnorm.io.formats import (
    FOREIGN_LAYOUTS,
    Foreign,
    check_output_name,
    read_foreign,
    template_flavor,
    write_foreign,
)
from vggnorm.io.layouts import ADAIN_ARCHS, export_layout, to_torchvision_layout
from vggnorm.io.models import (
    build_model,
    canonical_arch,
    checked_topology,
    conv_names,
    infer_arch,
    is_user_model,
    load_model,
    probe_size,
    topology,
)
from vggnorm.io.policy import report_base
from vggnorm.io.provenance import Normalization, Provenance, record_fields, to_metadata
from vggnorm.io.report import Report, layer_summary, report_paths, stream_summary
from vggnorm.io.statsfile import now, read_stats
from vggnorm.io.weights import APPLY, Weights, prefetch_random, resolve_weights
from vggnorm.options import Layout, Padding, Pooling, StreamScale, Weighting, parse
from vggnorm.version import __version__


@dataclass(frozen=True)
class ApplyResult:
    output: Path
    report_json: Path
    report_md: Path
    figure: Path | None
    report: Report
    notes: list[str]


def default_output(spec: str, arch: str, flavor: str | None = None) -> Path:
    """``X.normalized.pth`` beside a checkpoint file, else ``ARCH-WEIGHTS.normalized.pth`` here; in a
    Keras or MatConvNet layout (``flavor``: the input's), the input's own kind of name
    (``X.normalized.weights.h5``, ``.h5``, ``.mat``)."""
    if flavor is not None:
        p = Path(spec)
        stem = p.name.removesuffix(".weights.h5") if flavor == "keras3" else p.stem
        suffix = {"keras3": ".weights.h5", "legacy": ".h5"}.get(flavor, ".mat")
        return p.with_name(f"{stem}.normalized{suffix}")
    if os.path.isfile(spec):
        p = Path(spec)
        return p.with_name(f"{p.stem}.normalized{p.suffix if p.suffix == '.safetensors' else '.pth'}")
    if is_user_model(arch):  # its identity is a resolved path: name it FILE_NAME
        where, _, name = arch.rpartition(":")
        arch = f"{Path(where).stem if where.endswith('.py') else where}_{name}"
    return Path(f"{arch}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec)}.normalized.pth")


def weights_for(spec: str, stats: Stats, *, mmap: bool = True) -> Weights:
    """Resolve the checkpoint that ``stats`` belongs to; refuse one with another arch or other weights.
    ``mmap``: as ``resolve_weights``."""
    measured_with = stats.provenance
    arch = canonical_arch(measured_with.arch)
    weights = resolve_weights(spec, arch=None if os.path.isfile(spec) else arch, prefer=arch, given=APPLY, mmap=mmap)
    if weights.arch != arch:
        raise StatsMismatchError(f"the statistics are for {arch}, but {spec} is a {weights.arch} checkpoint")
    if weights.sha256 != measured_with.weights_sha256:
        given, resolved = measured_with.weights, measured_with.weights_path
        measured = f"{given}, i.e. {resolved}" if resolved and resolved != given else given
        raise StatsMismatchError(
            f"the statistics were measured with other weights ({measured}, sha256 "
            f"{measured_with.weights_sha256[:12]}...) than {spec} (sha256 {weights.sha256[:12]}...); "
            f"measure this checkpoint with `vggnorm compute-stats DIR --weights {spec}`"
        )
    return weights


def check_loads(
    state_dict: dict[str, torch.Tensor], arch: str, *, features_only: bool, add_affine: bool = False
) -> Check:
    """The output loads with ``strict=True`` into ``arch`` as its code builds it (``add_affine``: with
    the norms that had no affine parameters built with ``affine=True``)."""
    where = "torchvision's " if not is_user_model(arch) else ""
    desc = f"loads into {where}{arch} with strict=True" + (" (norms built with affine=True)" if add_affine else "")
    if features_only:
        return not_run(
            "loads",
            desc,
            "features-only checkpoint: it loads into model.features (or, in the gatys "
            "layout, Gatys-named code) with strict=True",
        )
    try:
        model = build_model(arch, device="meta", torchvision_class=True)
        if add_affine:
            with_affine(model, topology(arch, True))
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        return Check("loads", desc, "fail", detail=str(e).splitlines()[0])
    return Check("loads", desc, "pass")


def apply_stats(
    checkpoint: str,
    stats_path: Path,
    output: Path | None = None,
    *,
    features_only: bool = False,
    layout: Layout = Layout.TORCHVISION,
    include_classifier: bool = False,
    rule: DeadRule = DeadRule(),
    weighting: Weighting = Weighting.IMAGE,
    stream_scale: StreamScale = StreamScale.GEOMETRIC,
    model: str | None = None,
    force: bool = False,
) -> ApplyResult:
    """Fold ``stats`` into ``checkpoint`` (weights as ``resolve_weights`` takes them), self-check it, write it and its report.

    ``layout="gatys"`` writes the conv layers only, keyed ``conv1_1`` ... (BatchNorm folded into
    the convs for ``_bn`` models). The output is written only if the self-checks pass on a seeded
    probe batch: the written tensors, loaded back, give ReLU outputs equal to the original's
    divided by the scales (and the same logits), under the statistics' pooling.
    ``include_classifier`` also normalizes the ReLUs after fc6 and fc7 (measured with
    ``RunConfig.include_classifier``), compensating fc7 and fc8. ``weighting="class"`` normalizes the
    class-balanced means (statistics measured with ``--per-class``). ``rule`` decides which filters
    are dead (left unscaled). ``model``: the user model ``--model`` imported (its key), which must be the
    statistics' own. ``stream_scale`` chooses the scale a residual stream's sites share
    (``geometric`` or ``last``: ``core.fold._stream_scales``). The measurement policy and the rule are recorded with the output
    (``policy.recorded_provenance``), so ``verify --data`` re-measures the same way without being told.
    Named values (``layout``, ``weighting``, ``stream_scale``) are their enums' members or their strings.
    """
    layout = parse(Layout, layout, "layout")
    weighting = parse(Weighting, weighting, "weighting")
    stream_scale = parse(StreamScale, stream_scale, "stream_scale")
    stats_path = Path(stats_path)
    output = Path(output) if output is not None else None
    stats = read_stats(stats_path)
    if stats.provenance.shard:
        raise StatsFileError(
            f"{stats_path} is shard {stats.provenance.shard} of a measurement ({stats.num_images} images, not the whole "
            "folder): merge all the shards first with `vggnorm merge-stats s0.h5 s1.h5 ... -o all.h5` and apply that"
        )
    arch = canonical_arch(stats.provenance.arch)
    if model is not None and model != arch:  # --model names the model: it must be the statistics' one
        raise StatsMismatchError(
            f"{stats_path} was measured on {arch}, and --model names {model}: give the model the statistics "
            "were measured on, or measure this one"
        )
    drawing = prefetch_random(checkpoint, arch)  # a VGG's random:SEED: drawn in a thread from here on
    add_affine = stats.provenance.add_affine
    topo = checked_topology(arch, add_affine)  # a model that cannot be normalized is refused first
    measured_as = Measurement.from_attrs(stats.provenance.preprocess)
    flavor = template_flavor(checkpoint, layout) if layout in FOREIGN_LAYOUTS else None  # no weights read yet
    output = Path(output) if output is not None else default_output(checkpoint, arch, flavor)
    json_path, md_path = report_paths(report_base(output))
    png_path = md_path.with_suffix(".png") if have_matplotlib() else None
    outputs = (output, json_path, md_path, *([png_path] if png_path else []))
    inputs: list[str | os.PathLike[str]] = [stats_path, *([checkpoint] if os.path.exists(checkpoint) else [])]
    for p in outputs:
        check_writable(p, force=force, inputs=inputs)
    check_report_owner(json_path, output)
    check_output_name(output, layout, flavor)  # after: an input given as -o is named as such first
    if layout == "adain":
        check_adain(arch, measured_as)
    if (features_only or layout == "gatys") and not topo.names:
        # the features-only and Gatys layouts keep a chain of convs (VGG's, AlexNet's) without its classifier
        what = "--layout gatys names the convs of" if layout == "gatys" else "--features-only keeps the features of"
        raise InputError(
            f"{what} a chain of convs (a VGG or AlexNet); {arch} is not one (`vggnorm inspect {arch}` shows its "
            "structure): write the whole model (the default torchvision layout, or a .safetensors file)"
        )
    other_norms = sorted({s.norm for s in topo.all_sites if s.bn is not None and s.norm != "BatchNorm2d"})
    if layout != "torchvision" and other_norms:
        raise InputError(
            f"--layout {layout} folds each conv's BatchNorm into it, and {arch} has {', '.join(other_norms)} "
            "(which normalize per input, not by fixed statistics): use the torchvision layout"
        )
    # torchvision (check_loads needs it) and matplotlib are imported, and the figure drawn, in a thread meanwhile:
    # that Python-bound work overlaps the load, fold and self-check, whose torch kernels release the GIL
    # (random:SEED of a VGG is being drawn in a thread already: torchvision is imported here then)
    if drawing:
        import torchvision  # noqa: F401
    with meanwhile() as worker:
        for module in [*([] if drawing else ["torchvision"]), *(["matplotlib.pyplot"] if png_path else [])]:
            worker.submit(_import, module)
        # read into memory of its own (not memory-mapped) unless the input's structure is written back: the fold
        # overwrites the tensors in place, and a copy-on-write fault per page would cost more than the read
        weights = weights_for(checkpoint, stats, mmap=flavor is not None)
        template = weights.foreign if flavor is not None else None  # the input file, written over with the fold
        if flavor is not None and (template is None or template.flavor != flavor):
            raise InputError(f"{checkpoint} changed while it was read; run apply again")
        check_writable(output, force=force, inputs=inputs, size=state_dict_bytes(weights.state_dict))
        features_only = features_only or layout in ("gatys", "adain") or weights.features_only
        if include_classifier and features_only:
            raise InputError(
                "--include-classifier needs the classifier: it cannot go with --features-only, "
                "--layout gatys, or features-only weights"
            )
        scales = scales_from_stats(
            stats,
            topo,
            rule=rule,
            include_classifier=include_classifier,
            weighting=weighting,
            stream_scale=stream_scale,
        )
        # half-precision weights are folded and written in float32: float16 would round the fold by ~1e-3
        half = half_dtypes(weights.state_dict)
        base = upcast_half(weights.state_dict)
        # nearly silent filters whose means float32 may hold only to its own bound: named (verify allows that bound)
        unsafe = float32_unsafe(base, topo, stats, scales, weighting=weighting)
        scale_tensors = {n: s.scale for n, s in scales.items()}
        figure = (
            worker.submit(_figure, stats, scales, arch, output.name, conv_names(arch)) if png_path is not None else None
        )

        # the self-check's original side first, on the probe: the fold then overwrites the weights it ran on
        forward = measured_as.forward
        size = probe_size(arch, measured_as.transform.crop)
        probe = probe_input(size)
        original = load_model(arch, base, forward=forward, add_affine=add_affine)
        reference = reference_outputs(
            original, scale_tensors, probe, topology=topology(arch, True), logits=not features_only
        )
        del original

        # the fold, in place (the checkpoint is not held twice) but for a Keras or MatConvNet template's tensors
        if template is None:
            folded, lost = fold_in_place(base, scale_tensors, topo, features_only=features_only)
        else:
            folded, lost = fold_state_dict(base, scale_tensors, topo, features_only=features_only), {}
        exported = export_layout(folded, arch, layout, measured_as)
        _check_representable(folded, exported, base, scale_tensors, stats_path, lost)

        # self-check what will be written: the exported tensors, loaded back, against the original's reference
        reloaded = to_torchvision_layout(exported)
        normalized_arch = infer_arch(reloaded, prefer=arch)
        normalized = load_model(normalized_arch, reloaded, forward=forward)
        checks = check_function(
            reference,
            normalized,
            scale_tensors,
            probe,
            logits=not features_only,
            inputs=f"2 seeded random inputs (seed 0) at {size}x{size}, {forward.describe()}",
            topologies=(topology(arch, True), topology(normalized_arch, True)),
        )
        added = bool(topo.added_affine)
        checks.append(check_loads(exported, arch, features_only=features_only, add_affine=added))
        notes = []
        if unsafe:
            shown = "; ".join(f"{n} {f}" for n, f in list(unsafe.items())[:4]) + ("; ..." if len(unsafe) > 4 else "")
            notes.append(
                f"{sum(len(f) for f in unsafe.values())} nearly silent filter(s) whose normalized means float32 "
                f"arithmetic may move by more than verify's tolerance {DEFAULT_MEANS_TOL:g}: verify holds them to that "
                f"bound instead ({shown})"
            )
        if topo.streams:
            spreads = [st["spread"] for st in stream_summary(topo, scales, stream_scale)]
            notes.append(
                f"{len(topo.streams)} residual stream(s): their ReLUs share one scale per channel ({stream_scale}), "
                f"so their means are not all 1 (largest over smallest live mean in a stream: up to "
                f"{max(spreads, default=1):.3g}; the report lists them); every other ReLU's live means are 1"
            )
        if topo.left_unscaled:
            notes.append(
                f"left unscaled: {', '.join(topo.left_unscaled)} (its output reaches the model's output with no layer "
                "after it to compensate a scale, so normalizing it would change the outputs)"
            )
        if half:
            notes.append(
                f"{checkpoint} holds {' and '.join(half)} tensors: they were measured, folded and are written as float32 "
                "(half precision would round the fold by ~1e-3, beyond what verify allows)"
            )
        if png_path is None:
            notes.append("no figure: install matplotlib (pip install 'vggnorm[plot]') for OUT.report.png")
        if layout in ("gatys", "adain") and arch.endswith("_bn"):
            notes.append(
                f"BatchNorm folded into the convs (eval-mode statistics): the {layout} layout has no BatchNorm"
            )
        if layout == "adain":
            notes.append(
                f"adain layout: feed RGB in [0, 1]; its first (1x1) conv does the {measured_as.convention} preprocessing"
            )
        if template is not None:
            notes.append(_foreign_note(template, measured_as, features_only))
        provenance = Provenance(
            arch=arch,
            normalization=Normalization(
                preprocess=measured_as.as_attrs(),
                rule=rule,
                include_classifier=include_classifier,
                weighting=weighting,
                label_source=stats.provenance.label_source,
                stream_scale=stream_scale if topo.streams else None,
            ),
            measurement=stats.provenance,
            layout=layout,
            original=checkpoint,
            original_sha256=weights.sha256,
            stats=str(stats_path),
            created=now(),
            vggnorm_version=__version__,
        )
        report = Report(
            checkpoint=str(output),
            arch=arch,
            checks=checks,
            inputs={
                **record_fields(provenance),
                "stats_images": stats.num_images,
                "dead_rule": rule.describe(),
                "float32_bound_filters": unsafe,
                "features_only": features_only,
                "include_classifier": include_classifier,
                **({"note": "; ".join(notes)} if notes else {}),
            },
            layers=layer_summary(scales),
            figure=png_path.name if png_path else None,
            names=conv_names(arch),
            streams=stream_summary(topo, scales, stream_scale),
        )
        if not report.passed:
            raise CheckFailedError(
                f"the folded checkpoint failed its self-check, nothing was written: {failure_cause(checks, rule)}"
            )
        # the checkpoint, then its report: each whole, renamed into place one after the other (atomic_writes)
        with atomic_writes(outputs, force=force, inputs=inputs) as temps:
            if template is not None:
                write_foreign(template, exported, temps[0], features_only=features_only)
                _check_written(temps[0], output, exported, features_only=features_only)
            else:
                write_state_dict(
                    exported, temps[0], safetensors=output.suffix == ".safetensors", metadata=to_metadata(provenance)
                )
            report.write(temps[1], temps[2])
            if figure is not None:
                temps[3].write_bytes(figure.result())
        return ApplyResult(output, json_path, md_path, png_path, report, notes)


@contextlib.contextmanager
def meanwhile() -> Iterator[ThreadPoolExecutor]:
    """One worker thread, for the work the block hands it and takes the results of later. Leaving the block
    waits for the work under way (an exception cancels what has not started), so nothing is left running:
    matplotlib in particular, whose ``use`` reads a half-imported pyplot."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vggnorm-apply")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _import(module: str) -> None:
    """Import ``module`` ahead of its use (an import of it elsewhere meanwhile waits for it: Python's import
    lock); a failure is left to the import that needs it."""
    with contextlib.suppress(Exception):
        importlib.import_module(module)


def _figure(stats: Stats, scales: dict[str, LayerScales], arch: str, name: str, names: dict[str, str]) -> bytes:
    """The report's figure (PNG): each filter's measured mean, and its normalized one by construction
    (``names``: the convs' Gatys names, found in the main thread: models are built there)."""
    before = {n: stats.layers[n].mean for n in scales}
    png = io.BytesIO()
    plot_means(
        before,
        {n: before[n] / sc.scale for n, sc in scales.items()},
        {n: sc.dead for n, sc in scales.items()},
        png,
        title=f"{arch}: {name}, {stats.num_images} images",
        names=names,
        after_label="after (by construction: mean / scale)",
    )
    return png.getvalue()


def check_report_owner(report: Path, output: Path) -> None:
    """Refuse, even with ``--force``, to write over the report of another checkpoint that still exists
    (``x.report.json`` is both ``x.pth``'s and ``x.safetensors``'s): verify reads it as that one's policy."""
    if not report.is_file():
        return
    try:
        owner = json.loads(report.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return  # not a report of ours: --force decides, as for any file
    if isinstance(owner, str) and Path(owner).name != output.name and (output.parent / Path(owner).name).exists():
        raise OutputExistsError(
            f"{report} is the report of {output.parent / Path(owner).name}, which verify reads as that checkpoint's "
            f"policy: writing {output.name} there would replace it, even with --force; choose another name for -o"
        )


def failure_cause(checks: list[Check], rule: DeadRule) -> str:
    """What failed in apply's self-check, and its likely cause, from the figures: the checks run in float64, so
    an error near float32's rounding comes from weights amplified beyond what float32 holds, and a large one
    from a structure the fold does not keep (a bug in vggnorm's analysis: the model should have been refused)."""
    failed = [c for c in checks if c.status not in ("pass", "not run")]
    said = "; ".join(
        f"{c.name}: "
        + (f"{c.figure:.3g} > {c.tolerance:g}" if c.figure is not None else "could not run")
        + (f" ({c.detail})" if c.detail else "")
        for c in failed
    )
    if any(c.name == "loads" for c in failed):
        return f"{said}; the folded tensors do not fit the model's class"
    worst = max((c.figure for c in failed if c.figure is not None), default=float("nan"))
    if worst < 1e-2:  # NaN compares False: not a rounding effect
        return (
            f"{said}; an error this small is float32 rounding of filters amplified by tiny scales: count the "
            f"nearly silent ones as dead with a larger --rel-eps (now {rule.rel_eps:g})"
        )
    return (
        f"{said}; the folded model computes another function: a structure vggnorm accepted but does not normalize "
        "exactly (please report it, with the output of `vggnorm inspect`), or non-finite weights"
    )


def float32_unsafe(
    state_dict: dict[str, torch.Tensor],
    topo: Topology,
    stats: Stats,
    scales: dict[str, LayerScales],
    *,
    weighting: Weighting = Weighting.IMAGE,
    tol: float = DEFAULT_MEANS_TOL,
) -> dict[str, list[int]]:
    """The live filters whose ``normalize.float32_bounds`` exceeds ``tol`` (per site, filter indices): float32
    may move their re-measured means past verify's tolerance, so verify holds them to that bound instead."""
    means = {n: layer.balanced_mean if weighting == "class" else layer.mean for n, layer in stats.layers.items()}
    out = {}
    for name, bound in float32_bounds(state_dict, topo, means).items():
        if name in scales:
            dead = set(scales[name].dead)
            unsafe = [i for i in torch.nonzero(bound > tol).flatten().tolist() if i not in dead]
            if unsafe:
                out[name] = unsafe
    return out


def _check_representable(
    folded: dict[str, torch.Tensor],
    exported: dict[str, torch.Tensor],
    original: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    stats_path: Path,
    lost: dict[str, int],
) -> None:
    """The self-check compares activations, which tiny weights pass: refuse to write weights that overflowed
    or underflowed their dtype, with the verify's finite check, naming the tensor and the scales behind it.
    ``lost``: the underflows the in-place fold counted (``core.fold.fold_in_place``)."""
    extreme = max(scales.items(), key=lambda kv: float(kv[1].abs().log10().abs().max()))
    why = (
        f" (scales from {float(extreme[1].min()):.3g} to {float(extreme[1].max()):.3g} in {extreme[0]}, from the "
        f"means in {stats_path}: no measurement gives such means; measure again with `vggnorm compute-stats`)"
    )
    try:
        check_representable(folded, original, "the folded checkpoint", why, lost=lost)
        check_finite(exported, "the folded checkpoint")
    except InvalidValuesError as e:
        raise InvalidValuesError(f"{e}{'' if 'nothing was written' in str(e) else '; nothing was written'}") from e


def check_adain(arch: str, measured_as: Measurement) -> None:
    """AdaIN's encoder is VGG19's, pads by reflection and max-pools: refuse statistics measured otherwise."""
    if arch not in ADAIN_ARCHS:
        raise StatsMismatchError(f"--layout adain writes VGG19's encoder, and these statistics are for {arch}")
    if measured_as.forward.padding != Padding.REFLECT:
        raise StatsMismatchError(
            "--layout adain: AdaIN's encoder pads by reflection, and these statistics were measured with zero "
            "padding, so its means would not be 1; measure with `vggnorm compute-stats ... --padding reflect`"
        )
    if measured_as.forward.pooling != Pooling.MAX:
        raise StatsMismatchError("--layout adain: AdaIN's encoder max-pools; measure without --pooling avg")


def _foreign_note(template: Foreign, measured_as: Measurement, features_only: bool) -> str:
    """How the user's own code loads a Keras or MatConvNet output, and what it must feed it."""
    top = "include_top=False" if features_only or not template.top else "include_top=True"
    loads = (
        f"keras.applications.{template.arch.upper()}(weights=OUT, {top}) loads it"
        if template.format == "keras"
        else "the loaders of imagenet-vgg-verydeep .mat files (scipy.io.loadmat, the same indexing) read it"
    )
    own = {
        "caffe": "keras.applications' preprocess_input (caffe)",
        "matconvnet": "RGB 0-255 minus the file's mean pixel",
    }
    mean = measured_as.transform.mean
    if measured_as.convention == template.preprocess and tuple(mean) == tuple(template.mean):
        feed = f"keep feeding it as before: {own[template.preprocess]}, as measured"
    else:
        feed = (
            f"the means are 1 under the {measured_as.convention} preprocessing it was measured with (mean "
            f"{tuple(mean)}), not the file's own ({own[template.preprocess]}): feed it that"
        )
    return f"{template.format} layout, the input's structure ({template.describe()}): {loads}; {feed}"


def _check_written(tmp: Path, output: Path, exported: dict[str, torch.Tensor], *, features_only: bool) -> None:
    """Read the written Keras or MatConvNet file back: it must hold exactly the folded tensors."""
    back = read_foreign(tmp)
    expected = {k: v for k, v in exported.items() if not (features_only and k.startswith("classifier."))}
    if back is None or set(back.state_dict) != set(expected):
        raise WriteError(f"{output}: the written file does not read back as the folded weights; nothing was written")
    for key, value in expected.items():
        if not torch.equal(back.state_dict[key], value.to(back.state_dict[key].dtype)):
            raise WriteError(f"{output}: {key} does not read back as written; nothing was written")
