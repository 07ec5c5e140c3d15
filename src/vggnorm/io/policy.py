"""The measurement policy: how images become the network's input and which filters are dead.

``compute-stats`` records it in the statistics file; ``apply`` records it with its output, in its
``Provenance`` (the ``.safetensors`` metadata, or the report beside a ``.pth``); ``verify`` resolves it
from those, in that order, and options override what was recorded (``resolve_policy``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vggnorm.core.fold import DeadRule
from vggnorm.core.stats import Stats
from vggnorm.defaults import DEFAULT_STREAM_SCALE
from vggnorm.errors import VggnormError
from vggnorm.io import data as data_mod
from vggnorm.io.provenance import Normalization, Provenance, from_metadata, from_report
from vggnorm.io.report import report_paths


def report_base(output: Path) -> Path:
    """``OUT.report`` for ``OUT.pth``: the report apply writes beside its checkpoint."""
    return output.with_name(output.name.removesuffix(output.suffix) + ".report")


def _native_preprocess(checkpoint: Path, asked: str | None) -> dict[str, Any]:
    """A Keras or MatConvNet file's own preprocessing (caffe; matconvnet with the file's mean), as
    ``default_preprocess`` arguments; {} for other files, or when ``asked`` is another preprocessing."""
    from vggnorm.io.formats import native_preprocess

    native = native_preprocess(checkpoint)
    if native is None or asked not in (None, native[0]):
        return {}
    return {"preprocess": native[0], "mean_pixel": native[1]}


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
        except (OSError, ValueError):
            return None
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

    preprocess: data_mod.Preprocess
    rule: DeadRule
    include_classifier: bool
    source: str
    weighting: str = "image"  # or "class": the class-balanced means are checked
    label_source: str = ""  # with class weighting: "folders" or the labels file
    stream_scale: str = DEFAULT_STREAM_SCALE  # how apply chose a residual stream's shared scales

    def describe(self) -> str:
        p = self.preprocess
        what = (
            f"resize {p.resize}, crop {p.crop}, {p.preprocess} preprocessing, {p.pooling} pooling, "
            f"{p.padding} padding, decode {p.decode}"
        )
        weighting = f"; class-balanced means (labels: {self.label_source})" if self.weighting == "class" else ""
        return f"{what}; dead filters: {self.rule.describe()}{weighting} (from {self.source})"


def resolve_policy(
    normalized_path: Path,
    stats: Stats | None,
    arch: str,
    *,
    rel_eps: float | None,
    eps: float | None,
    include_classifier: bool | None,
    weighting: str | None = None,
    labels: str | None = None,
    stream_scale: str | None = None,
    **given: Any,
) -> Policy:
    """The measurement policy: the statistics' (options may only repeat it); else the one ``apply``
    recorded with the checkpoint, overridden by options; else the weights' defaults and the options.
    The dead rule and ``include_classifier``: options, else what apply recorded, else the defaults."""
    recorded = recorded_provenance(normalized_path)
    rec = recorded[0].normalization if recorded else Normalization()
    if stats is not None:
        preprocess = data_mod.Preprocess.from_attrs(dict(stats.provenance.preprocess))
        for name, value in given.items():
            if value is not None and value != getattr(preprocess, name):
                raise VggnormError(
                    f"--{name} {value} differs from the statistics' {name} {getattr(preprocess, name)}; "
                    "leave it out: with --stats, verify measures as compute-stats did"
                )
        source = "the statistics file"
    elif recorded:
        options = {k: v for k, v in given.items() if v is not None}
        preprocess = replace(data_mod.Preprocess.from_attrs(dict(rec.preprocess)), **options)
        source = recorded[1] + (", overridden by options" if any(v is not None for v in given.values()) else "")
    else:
        options = {k: v for k, v in given.items() if v is not None}
        native = _native_preprocess(normalized_path, options.get("preprocess"))
        preprocess = data_mod.default_preprocess(arch, **{**native, **options})
        source = ("the file's own preprocessing, " if native else "") + "defaults"
        source += " and options" if options else ""
    rule = DeadRule(
        rel_eps=rel_eps if rel_eps is not None else rec.rule.rel_eps, eps=eps if eps is not None else rec.rule.eps
    )
    fc = include_classifier if include_classifier is not None else rec.include_classifier
    weighting = weighting or rec.weighting
    label_source = labels or rec.label_source or (stats.provenance.label_source if stats else "")
    stream_scale = stream_scale or rec.stream_scale or DEFAULT_STREAM_SCALE
    return Policy(preprocess, rule, fc, source, weighting, label_source or "folders", stream_scale)
