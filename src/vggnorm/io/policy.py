"""The measurement policy: how images become the network's input and which filters are dead.

``compute-stats`` records it in the statistics file; ``apply`` records it with its output, in its
``Provenance`` (the ``.safetensors`` metadata, or the report beside a ``.pth``); ``verify`` resolves it
from those, in that order, and options override what was recorded (``resolve_policy``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from vggnorm.core.fold import DeadRule
from vggnorm.core.stats import Stats
from vggnorm.errors import StatsFileError, UsageError
from vggnorm.io import data as data_mod
from vggnorm.io.models import ForwardPolicy
from vggnorm.io.provenance import REDO, Normalization, Provenance, from_metadata, from_report
from vggnorm.io.report import report_paths
from vggnorm.options import InputConvention, Padding, Pooling, StreamScale, Weighting, parse

# What to do about a damaged record when verify was given --stats already (``io.provenance.REDO`` says to give it)
REDO_WITH_STATS = (
    "write it again with `vggnorm apply` (verify reads apply's dead rule, --include-classifier, --weighting and "
    "--stream-scale from it, with --stats too), or move it away and give those as options"
)


def report_base(output: Path) -> Path:
    """``OUT.report`` for ``OUT.pth``: the report apply writes beside its checkpoint."""
    return output.with_name(output.name.removesuffix(output.suffix) + ".report")


def _native_preprocess(
    checkpoint: Path, asked: InputConvention | None
) -> tuple[InputConvention, tuple[float, ...]] | None:
    """A Keras or MatConvNet file's own input convention and mean pixel (caffe; matconvnet with the file's
    mean); None for other files, or when ``asked`` is another convention."""
    from vggnorm.io.formats import native_preprocess

    native = native_preprocess(checkpoint)
    if native is None or asked not in (None, native[0]):
        return None
    return native


def recorded_provenance(checkpoint: Path) -> tuple[Provenance, str] | None:
    """The record ``apply`` wrote with ``checkpoint``, and where from: the ``.safetensors`` metadata, or the
    report written beside a ``.pth`` (``OUT.report.json``). A damaged record is a ``StatsFileError``."""
    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(checkpoint), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # an unreadable file is reported by the loader, with its reason
            return None
        where = f"{checkpoint} (safetensors metadata)"
        record = from_metadata(meta, where)
        return (record, where) if record is not None else None
    report = report_paths(report_base(checkpoint))[0]
    if report.is_file():
        try:
            written = json.loads(report.read_text())
        except OSError:
            return None
        except ValueError as e:  # a damaged record, as damaged metadata is: never the defaults without a word
            raise StatsFileError(f"{report}: not JSON ({e}): {REDO}") from e
        found = from_report(written, str(report))
        return (found, str(report)) if found is not None else None
    return None


def recorded_arch(checkpoint: Path) -> str | None:
    """The torchvision architecture ``apply`` recorded with ``checkpoint`` (the ``.safetensors`` metadata, or
    the report beside a ``.pth``): how a ResNet's checkpoint is known without --stats, since only VGGs and
    AlexNet are recognized by their keys. None for a user model or when nothing was recorded."""
    from vggnorm.defaults import torchvision_classifiers

    checkpoint = Path(checkpoint)
    arch: object = None
    if checkpoint.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(checkpoint), "pt") as f:
                arch = (f.metadata() or {}).get("arch")
        except Exception:  # an unreadable file is reported by the loader, with its reason
            return None
    else:
        report = report_paths(report_base(checkpoint))[0]
        try:
            arch = json.loads(report.read_text()).get("arch") if report.is_file() else None
        except (OSError, ValueError, AttributeError):
            return None
    return arch if isinstance(arch, str) and arch in torchvision_classifiers() else None


@dataclass(frozen=True)
class Policy:
    """How verify measures, and where each part of that came from (said in the report and on stdout)."""

    measurement: data_mod.Measurement
    rule: DeadRule
    include_classifier: bool
    source: str
    weighting: Weighting = Weighting.IMAGE  # or class: the class-balanced means are checked
    label_source: str = ""  # with class weighting: "folders" or the labels file
    stream_scale: StreamScale = StreamScale.GEOMETRIC  # how apply chose a residual stream's shared scales

    def describe(self) -> str:
        weighting = f"; class-balanced means (labels: {self.label_source})" if self.weighting == Weighting.CLASS else ""
        return f"{self.measurement.describe()}; dead filters: {self.rule.describe()}{weighting} (from {self.source})"


@dataclass(frozen=True)
class Overrides:
    """The measurement policy where given (None: the statistics', else what apply recorded, else the defaults):
    the dead rule, the preprocessing and model changes, which means are checked and how streams were scaled."""

    rel_eps: float | None = None
    eps: float | None = None
    resize: int | None = None
    crop: int | None = None
    convention: InputConvention | None = None
    pooling: Pooling | None = None
    padding: Padding | None = None
    include_classifier: bool | None = None  # the fc ReLUs too
    weighting: Weighting | None = None  # the means over all images, or class-balanced
    labels: str | None = None  # with class weighting on a flat folder: the labels file
    stream_scale: StreamScale | None = None  # how apply chose a residual stream's shared scales

    def __post_init__(self) -> None:  # a named value as its enum's member or its string, as the API takes them
        for name, kind in (
            ("convention", InputConvention),
            ("pooling", Pooling),
            ("padding", Padding),
            ("weighting", Weighting),
            ("stream_scale", StreamScale),
        ):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse(kind, value, name))


def resolve_policy(normalized_path: Path, stats: Stats | None, arch: str, o: Overrides = Overrides()) -> Policy:
    """The measurement policy: the statistics' (options may only repeat it); else the one ``apply``
    recorded with the checkpoint, overridden by options; else the weights' defaults and the options.
    The dead rule and ``include_classifier``: options, else what apply recorded, else the defaults."""
    try:
        recorded = recorded_provenance(normalized_path)
    except StatsFileError as e:
        if stats is None or REDO not in str(e):
            raise
        # with --stats the record still gives apply's dead rule, classifier and weighting: --stats is no way out
        raise StatsFileError(str(e).replace(REDO, REDO_WITH_STATS)) from e
    rec = recorded[0].normalization if recorded else Normalization()
    resize, crop, convention, pooling, padding = o.resize, o.crop, o.convention, o.pooling, o.padding
    given = {"resize": resize, "crop": crop, "preprocess": convention, "pooling": pooling, "padding": padding}
    options = any(v is not None for v in given.values())
    if stats is not None:
        measurement = data_mod.Measurement.from_attrs(stats.provenance.preprocess)
        t, forward = measurement.transform, measurement.forward
        measured = {
            "resize": t.resize,
            "crop": t.crop,
            "preprocess": measurement.convention,
            "pooling": forward.pooling,
            "padding": forward.padding,
        }
        for name, value in given.items():
            if value is not None and value != measured[name]:
                raise UsageError(
                    f"--{name} {value} differs from the statistics' {name} {measured[name]}; "
                    "leave it out: with --stats, verify measures as compute-stats did"
                )
        source = "the statistics file"
    elif recorded:
        was = data_mod.Measurement.from_attrs(rec.preprocess)
        measurement = data_mod.Measurement(
            replace(
                was.transform,
                resize=resize if resize is not None else was.transform.resize,
                crop=crop if crop is not None else was.transform.crop,
            ),
            convention or was.convention,
            ForwardPolicy(pooling or was.forward.pooling, padding or was.forward.padding),
            was.decoder,
        )
        source = recorded[1] + (", overridden by options" if options else "")
    else:
        native = _native_preprocess(normalized_path, convention)
        kind = convention or (native[0] if native else InputConvention.TORCHVISION)
        transform = data_mod.default_transform(
            arch, resize=resize, crop=crop, convention=kind, mean_pixel=native[1] if native else None
        )
        forward = ForwardPolicy(pooling or Pooling.MAX, padding or Padding.MODEL)
        measurement = data_mod.Measurement(transform, kind, forward)
        source = ("the file's own preprocessing, " if native else "") + "defaults"
        source += " and options" if options else ""
    rule = DeadRule(
        rel_eps=o.rel_eps if o.rel_eps is not None else rec.rule.rel_eps,
        eps=o.eps if o.eps is not None else rec.rule.eps,
    )
    fc = o.include_classifier if o.include_classifier is not None else rec.include_classifier
    weighting = o.weighting or rec.weighting
    label_source = o.labels or rec.label_source or (stats.provenance.label_source if stats else "")
    stream_scale = o.stream_scale or rec.stream_scale or StreamScale.GEOMETRIC
    return Policy(measurement, rule, fc, source, weighting, label_source or "folders", stream_scale)
