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
from typing import Any

import torch

from vggnorm.analysis.topology import Topology, with_affine
from vggnorm.core.checks import Check, Reference, check_function, not_run, probe_input, reference_outputs
from vggnorm.core.device import one_thread
from vggnorm.core.fold import (
    DeadRule,
    LayerScales,
    float32_bounds,
    fold_in_place,
    fold_state_dict,
    scales_from_stats,
)
from vggnorm.core.state import StateDict
from vggnorm.core.stats import Stats
from vggnorm.defaults import DEFAULT_MEANS_TOL
from vggnorm.errors import (
    CheckFailedError,
    InputError,
    InvalidValuesError,
    OutputExistsError,
    SetupError,
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
    ForwardPolicy,
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
    """Resolve the checkpoint that ``stats`` belongs to; refuse one with another arch. Its hash is computed in a
    thread (hashlib releases the GIL), for ``check_same_weights`` to take once the work that only reads the
    weights is done. ``mmap``: as ``resolve_weights``."""
    arch = canonical_arch(stats.provenance.arch)
    weights = resolve_weights(
        spec,
        arch=None if os.path.isfile(spec) else arch,
        prefer=arch,
        given=APPLY,
        mmap=mmap,
        background_hash=True,
    )
    if weights.arch != arch:
        raise StatsMismatchError(f"the statistics are for {arch}, but {spec} is a {weights.arch} checkpoint")
    return weights


def check_same_weights(spec: str, weights: Weights, stats: Stats) -> None:
    """Refuse weights other than those the statistics were measured with (their content hashes differ)."""
    measured_with = stats.provenance
    if weights.sha256 != measured_with.weights_sha256:
        given, resolved = measured_with.weights, measured_with.weights_path
        measured = f"{given}, i.e. {resolved}" if resolved and resolved != given else given
        raise StatsMismatchError(
            f"the statistics were measured with other weights ({measured}, sha256 "
            f"{measured_with.weights_sha256[:12]}...) than {spec} (sha256 {weights.sha256[:12]}...); "
            f"measure this checkpoint with `vggnorm compute-stats DIR --weights {spec}`"
        )


def check_loads(
    state_dict: dict[str, torch.Tensor], arch: str, *, features_only: bool, add_affine: bool = False
) -> Check:
    """The output loads with ``strict=True`` into ``arch`` as its code builds it (``add_affine``: with
    the norms that had no affine parameters built with ``affine=True``). A torchvision VGG is built as
    ``io.models.VGG``, whose state_dict keys and shapes are torchvision's (``tests/test_models.py``), all
    that a strict load checks: torchvision is not imported for it."""
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
        model = build_model(arch, device="meta")
        if add_affine:
            with_affine(model, topology(arch, True))
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:  # "Error(s) in loading state_dict for VGG:", then a line per kind of error
        lines = [line.strip() for line in str(e).splitlines()]
        return Check("loads", desc, "fail", detail="; ".join(filter(None, lines[1:])) or lines[0])
    return Check("loads", desc, "pass")


@dataclass(frozen=True)
class ApplyOptions:
    """What apply is asked to do, besides its files (the command's options).

    ``layout="gatys"`` writes the conv layers only, keyed ``conv1_1`` ... (BatchNorm folded into the convs
    for ``_bn`` models). ``include_classifier`` also normalizes the ReLUs after fc6 and fc7 (measured with
    ``RunConfig.include_classifier``), compensating fc7 and fc8. ``weighting="class"`` normalizes the
    class-balanced means (statistics measured with ``--per-class``). ``rule`` decides which filters are
    dead (left unscaled). ``stream_scale`` chooses the scale a residual stream's sites share (``geometric``
    or ``last``: ``core.fold._stream_scales``). ``model``: the user model ``--model`` imported (its key),
    which must be the statistics' own. ``plot``: also draw OUT.report.png (needs matplotlib)."""

    features_only: bool = False
    layout: Layout = Layout.TORCHVISION
    include_classifier: bool = False
    rule: DeadRule = DeadRule()
    weighting: Weighting = Weighting.IMAGE
    stream_scale: StreamScale = StreamScale.GEOMETRIC
    model: str | None = None
    force: bool = False
    plot: bool = False  # also draw OUT.report.png (matplotlib)

    def __post_init__(self) -> None:  # a named value as its enum's member or its string, as the API takes them
        object.__setattr__(self, "layout", parse(Layout, self.layout, "layout"))
        object.__setattr__(self, "weighting", parse(Weighting, self.weighting, "weighting"))
        object.__setattr__(self, "stream_scale", parse(StreamScale, self.stream_scale, "stream_scale"))


@dataclass(frozen=True)
class Plan:
    """What apply will do, decided before a weight is read: the statistics, the model's structure, and
    the outputs, named and free to write."""

    checkpoint: str  # the weights as given (a file, a torchvision weights name, random:SEED)
    stats_path: Path
    stats: Stats
    arch: str
    topo: Topology
    flavor: str | None  # a Keras or MatConvNet layout: the input's flavor, written back
    output: Path
    json_path: Path
    md_path: Path
    png_path: Path | None  # None: no figure asked for (--plot)
    options: ApplyOptions

    @property
    def outputs(self) -> tuple[Path, ...]:
        return (self.output, self.json_path, self.md_path, *([self.png_path] if self.png_path else []))

    @property
    def inputs(self) -> list[str | os.PathLike[str]]:
        """The files read, which no output may replace."""
        return [self.stats_path, *([self.checkpoint] if os.path.exists(self.checkpoint) else [])]

    @property
    def add_affine(self) -> bool:
        return self.stats.provenance.add_affine

    @property
    def measured_as(self) -> Measurement:
        return Measurement.from_attrs(self.stats.provenance.preprocess)


@dataclass(frozen=True)
class Original:
    """The weights, read and checked against the statistics, and the scales to fold into them."""

    weights: Weights
    base: StateDict  # the weights in float32 or wider (``upcast_half``): the fold's input
    half: list[str]  # the half-precision dtypes the checkpoint held
    template: Foreign | None  # a Keras or MatConvNet input, written over with the fold
    features_only: bool
    scales: dict[str, LayerScales]
    unsafe: dict[str, list[int]]  # nearly silent filters held to float32's bound (``float32_unsafe``)

    @property
    def scale_tensors(self) -> dict[str, torch.Tensor]:
        return {n: s.scale for n, s in self.scales.items()}


def apply_stats(
    checkpoint: str, stats_path: Path, output: Path | None = None, options: ApplyOptions = ApplyOptions()
) -> ApplyResult:
    """Fold the statistics at ``stats_path`` into ``checkpoint`` (weights as ``resolve_weights`` takes them), self-check it, write it
    (to ``output``, default ``default_output``) and its report.

    The output is written only if the self-checks pass on a seeded probe batch: the written tensors,
    loaded back, give ReLU outputs equal to the original's divided by the scales (and the same logits),
    under the statistics' pooling. The measurement policy and the rule are recorded with the output
    (``policy.recorded_provenance``), so ``verify --data`` re-measures the same way without being told.
    Named values (``layout``, ``weighting``, ``stream_scale``) are their enums' members or their strings.
    """
    plan = plan_apply(checkpoint, Path(stats_path), Path(output) if output is not None else None, options)
    # matplotlib is imported, and the figure drawn, in a thread meanwhile: that Python-bound work overlaps the
    # load, fold and self-check, whose torch kernels release the GIL
    with one_thread(), meanwhile() as worker:
        if plan.png_path is not None:
            worker.submit(_import, "matplotlib.pyplot")
        original = read_original(plan)
        figure = worker.submit(_figure, plan, original.scales) if plan.png_path is not None else None
        reference = original_outputs(plan, original)
        exported = fold_and_export(plan, original)
        notes = apply_notes(plan, original)
        provenance, inputs = records(plan, original, notes)
        with atomic_writes(plan.outputs, force=options.force, inputs=plan.inputs) as temps:
            # the checkpoint is written (a temporary file) while it is self-checked: the disk and the float64
            # arithmetic overlap, and it is renamed into place only if the checks pass
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vggnorm-write") as writer:
                written = writer.submit(write_checkpoint, plan, original, exported, temps[0], to_metadata(provenance))
                checks = self_check(plan, original, reference, exported)
            written.result()
            report = make_report(plan, original, checks, inputs)
            if not report.passed:
                raise CheckFailedError(
                    "the folded checkpoint failed its self-check, nothing was written: "
                    f"{failure_cause(checks, options.rule)}"
                )
            report.write(temps[1], temps[2])
            if figure is not None:
                temps[3].write_bytes(figure.result())
    return ApplyResult(plan.output, plan.json_path, plan.md_path, plan.png_path, report, notes)


def plan_apply(checkpoint: str, stats_path: Path, output: Path | None, options: ApplyOptions) -> Plan:
    """Read the statistics and decide the outputs; refuse, before any weight is read, what cannot be done."""
    stats = read_stats(stats_path)
    if stats.provenance.shard:
        raise StatsFileError(
            f"{stats_path} is shard {stats.provenance.shard} of a measurement ({stats.num_images} images, not the whole "
            "folder): merge all the shards first with `vggnorm merge-stats s0.h5 s1.h5 ... -o all.h5` and apply that"
        )
    arch = canonical_arch(stats.provenance.arch)
    if options.model is not None and options.model != arch:  # --model names the model: the statistics' one
        raise StatsMismatchError(
            f"{stats_path} was measured on {arch}, and --model names {options.model}: give the model the statistics "
            "were measured on, or measure this one"
        )
    prefetch_random(checkpoint, arch)  # a VGG's random:SEED: drawn in a thread from here on
    topo = checked_topology(arch, stats.provenance.add_affine)  # a model that cannot be normalized
    layout = options.layout
    flavor = template_flavor(checkpoint, layout) if layout in FOREIGN_LAYOUTS else None  # no weights read yet
    output = Path(output) if output is not None else default_output(checkpoint, arch, flavor)
    json_path, md_path = report_paths(report_base(output))
    if options.plot and not have_matplotlib():
        raise SetupError("--plot draws the figure with matplotlib, which is not installed: pip install 'vggnorm[plot]'")
    png_path = md_path.with_suffix(".png") if options.plot else None
    plan = Plan(checkpoint, stats_path, stats, arch, topo, flavor, output, json_path, md_path, png_path, options)
    for p in plan.outputs:
        check_writable(p, force=options.force, inputs=plan.inputs)
    check_report_owner(json_path, output)
    check_output_name(output, layout, flavor)  # after: an input given as -o is named as such first
    check_layout(plan)
    return plan


def check_layout(plan: Plan) -> None:
    """Refuse a layout the model cannot be written in."""
    layout, arch, topo = plan.options.layout, plan.arch, plan.topo
    if layout == "adain":
        check_adain(arch, plan.measured_as)
    if (plan.options.features_only or layout == "gatys") and not topo.names:
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


def read_original(plan: Plan) -> Original:
    """Read the weights (their hash computed in a thread: ``check_same_weights`` waits for it) and the
    scales to fold into them."""
    options, stats = plan.options, plan.stats
    # read into memory of its own (not memory-mapped) unless the input's structure is written back: the fold
    # overwrites the tensors in place, and a copy-on-write fault per page would cost more than the read
    weights = weights_for(plan.checkpoint, stats, mmap=plan.flavor is not None)
    template = weights.foreign if plan.flavor is not None else None
    if plan.flavor is not None and (template is None or template.flavor != plan.flavor):
        raise InputError(f"{plan.checkpoint} changed while it was read; run apply again")
    check_writable(plan.output, force=options.force, inputs=plan.inputs, size=state_dict_bytes(weights.state_dict))
    features_only = options.features_only or options.layout in ("gatys", "adain") or weights.features_only
    if options.include_classifier and features_only:
        raise InputError(
            "--include-classifier needs the classifier: it cannot go with --features-only, "
            "--layout gatys, or features-only weights"
        )
    scales = scales_from_stats(
        stats,
        plan.topo,
        rule=options.rule,
        include_classifier=options.include_classifier,
        weighting=options.weighting,
        stream_scale=options.stream_scale,
    )
    # half-precision weights are folded and written in float32: float16 would round the fold by ~1e-3
    base = upcast_half(weights.state_dict)
    # nearly silent filters whose means float32 may hold only to its own bound: named (verify allows that bound)
    unsafe = float32_unsafe(base, plan.topo, stats, scales, weighting=options.weighting)
    return Original(weights, base, half_dtypes(weights.state_dict), template, features_only, scales, unsafe)


def probe_policy(plan: Plan) -> tuple[int, ForwardPolicy]:
    """The self-check's probe size and forward policy (pooling, padding): the statistics'."""
    measured_as = plan.measured_as
    return probe_size(plan.arch, measured_as.transform.crop), measured_as.forward


def original_outputs(plan: Plan, original: Original) -> Reference:
    """The self-check's original side, on the probe (``core.checks.reference_outputs``), taken first: the fold
    then overwrites the weights it ran on."""
    size, forward = probe_policy(plan)
    model = load_model(plan.arch, original.base, forward=forward, add_affine=plan.add_affine)
    return reference_outputs(
        model,
        original.scale_tensors,
        probe_input(size),
        topology=topology(plan.arch, True),
        logits=not original.features_only,
    )


def fold_and_export(plan: Plan, original: Original) -> StateDict:
    """The fold (``core.fold``), in the requested layout: in place (the checkpoint is not held twice) but for a
    Keras or MatConvNet template's tensors, once the weights are known to be the statistics' own. Refuses
    weights that overflowed or underflowed their dtype."""
    check_same_weights(plan.checkpoint, original.weights, plan.stats)
    features_only, scales = original.features_only, original.scale_tensors
    if original.template is None:
        folded, lost = fold_in_place(original.base, scales, plan.topo, features_only=features_only)
    else:
        folded, lost = fold_state_dict(original.base, scales, plan.topo, features_only=features_only), {}
    exported = export_layout(folded, plan.arch, plan.options.layout, plan.measured_as)
    _check_representable(folded, exported, original.base, scales, plan.stats_path, lost)
    return exported


def self_check(plan: Plan, original: Original, reference: Reference, exported: StateDict) -> list[Check]:
    """What will be written, loaded back, against the original's reference (``core.checks.check_function``),
    and whether it loads into the model's class."""
    size, forward = probe_policy(plan)
    reloaded = to_torchvision_layout(exported)
    normalized_arch = infer_arch(reloaded, prefer=plan.arch)
    normalized = load_model(normalized_arch, reloaded, forward=forward)
    checks = check_function(
        reference,
        normalized,
        original.scale_tensors,
        reference.x,
        logits=not original.features_only,
        inputs=f"2 seeded random inputs (seed 0) at {size}x{size}, {forward.describe()}",
        topologies=(topology(plan.arch, True), topology(normalized_arch, True)),
    )
    added = bool(plan.topo.added_affine)
    checks.append(check_loads(exported, plan.arch, features_only=original.features_only, add_affine=added))
    return checks


def apply_notes(plan: Plan, original: Original) -> list[str]:
    """What the user should know about the output: what was not normalized to 1, and how to load and feed it."""
    topo, options, arch = plan.topo, plan.options, plan.arch
    notes = []
    if unsafe := original.unsafe:
        shown = "; ".join(f"{n} {f}" for n, f in list(unsafe.items())[:4]) + ("; ..." if len(unsafe) > 4 else "")
        notes.append(
            f"{sum(len(f) for f in unsafe.values())} nearly silent filter(s) whose normalized means float32 "
            f"arithmetic may move by more than verify's tolerance {DEFAULT_MEANS_TOL:g}: verify holds them to that "
            f"bound instead ({shown})"
        )
    if topo.streams:
        spreads = [st["spread"] for st in stream_summary(topo, original.scales, options.stream_scale)]
        notes.append(
            f"{len(topo.streams)} residual stream(s): their ReLUs share one scale per channel "
            f"({options.stream_scale}), so their means are not all 1 (largest over smallest live mean in a stream: "
            f"up to {max(spreads, default=1):.3g}; the report lists them); every other ReLU's live means are 1"
        )
    if topo.left_unscaled:
        notes.append(
            f"left unscaled: {', '.join(topo.left_unscaled)} (its output reaches the model's output with no layer "
            "after it to compensate a scale, so normalizing it would change the outputs)"
        )
    if original.half:
        notes.append(
            f"{plan.checkpoint} holds {' and '.join(original.half)} tensors: they were measured, folded and are "
            "written as float32 (half precision would round the fold by ~1e-3, beyond what verify allows)"
        )
    if options.layout in ("gatys", "adain") and arch.endswith("_bn"):
        notes.append(
            f"BatchNorm folded into the convs (eval-mode statistics): the {options.layout} layout has no BatchNorm"
        )
    if options.layout == "adain":
        notes.append(
            f"adain layout: feed RGB in [0, 1]; its first (1x1) conv does the {plan.measured_as.convention} "
            "preprocessing"
        )
    if original.template is not None:
        notes.append(_foreign_note(original.template, plan.measured_as, original.features_only))
    return notes


def records(plan: Plan, original: Original, notes: list[str]) -> tuple[Provenance, dict[str, Any]]:
    """What the output records of how it was made: the provenance (written alike into the checkpoint's
    metadata and the report) and the report's inputs; both hold the measurement policy ``verify --data``
    re-measures with."""
    options, stats = plan.options, plan.stats
    provenance = Provenance(
        arch=plan.arch,
        normalization=Normalization(
            preprocess=plan.measured_as.as_attrs(),
            rule=options.rule,
            include_classifier=options.include_classifier,
            weighting=options.weighting,
            label_source=stats.provenance.label_source,
            stream_scale=options.stream_scale if plan.topo.streams else None,
        ),
        measurement=stats.provenance,
        layout=options.layout,
        original=plan.checkpoint,
        original_sha256=original.weights.sha256,
        stats=str(plan.stats_path),
        created=now(),
        vggnorm_version=__version__,
    )
    inputs = {
        **record_fields(provenance),
        "stats_images": stats.num_images,
        "dead_rule": options.rule.describe(),
        "float32_bound_filters": original.unsafe,
        "features_only": original.features_only,
        "include_classifier": options.include_classifier,
        **({"note": "; ".join(notes)} if notes else {}),
    }
    return provenance, inputs


def make_report(plan: Plan, original: Original, checks: list[Check], inputs: dict[str, Any]) -> Report:
    """The report: the checks, the inputs (``records``), the scales per layer and per residual stream."""
    return Report(
        checkpoint=str(plan.output),
        arch=plan.arch,
        checks=checks,
        inputs=inputs,
        layers=layer_summary(original.scales),
        figure=plan.png_path.name if plan.png_path else None,
        names=conv_names(plan.arch),
        streams=stream_summary(plan.topo, original.scales, plan.options.stream_scale),
    )


def write_checkpoint(plan: Plan, original: Original, exported: StateDict, tmp: Path, meta: dict[str, str]) -> None:
    """The folded checkpoint into ``tmp`` (``io.checkpoint.atomic_writes`` renames it, with the report and
    figure, one after the other): in the input's own format for a Keras or MatConvNet template (read back
    to check), else a ``.pth`` or ``.safetensors`` with the provenance in ``meta``."""
    if original.template is not None:
        write_foreign(original.template, exported, tmp, features_only=original.features_only)
        _check_written(tmp, plan.output, exported, features_only=original.features_only)
    else:
        write_state_dict(exported, tmp, safetensors=plan.output.suffix == ".safetensors", metadata=meta)


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


def _figure(plan: Plan, scales: dict[str, LayerScales]) -> bytes:
    """The report's figure (PNG): each filter's measured mean, and its normalized one by construction."""
    stats = plan.stats
    before = {n: stats.layers[n].mean for n in scales}
    png = io.BytesIO()
    plot_means(
        before,
        {n: before[n] / sc.scale for n, sc in scales.items()},
        {n: sc.dead for n, sc in scales.items()},
        png,
        title=f"{plan.arch}: {plan.output.name}, {stats.num_images} images",
        names=plan.topo.names,
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
    means = {
        n: layer.balanced_mean if weighting == Weighting.CLASS else layer.mean for n, layer in stats.layers.items()
    }
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
