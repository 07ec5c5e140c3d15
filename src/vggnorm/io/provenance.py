"""The record ``apply`` writes with a normalized checkpoint: every input it came from, and what it chose.

One versioned record, ``Provenance``: the statistics' own record (``core.provenance.MeasurementRecord``: the model,
the weights and their hash, the images and their fingerprint, the labels and their hash, the measurement
policy, the versions), apply's choices (``Normalization``: dead rule, classifier, weighting, residual-stream
policy) and the checkpoint it folded, with its hash. It is written one way (``record_fields``): as the
``.safetensors`` metadata (``to_metadata``: each field a string, JSON where it is not text) and as the report's
``inputs``. The statistics file holds the ``MeasurementRecord`` as its root attributes (``io.statsfile``), under the
file's own ``format_version``.

Read back (``from_metadata``, ``from_report``), each field goes through the statistics file's readers, so an
edited or damaged record is one ``StatsFileError`` naming the field and what to do. Records written before
the record had a version (no ``provenance_version``, no ``measurement``) read as version 1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from vggnorm.core.fold import DeadRule
from vggnorm.core.provenance import MeasurementRecord
from vggnorm.errors import StatsFileError
from vggnorm.io.statsfile import (
    RECORD_SCHEMA,
    RECORDED_POLICY_SCHEMA,
    check_fields,
    measurement_attrs,
    policy_values,
    read_measurement,
)
from vggnorm.options import Layout, StreamScale, Weighting

PROVENANCE_VERSION = 1

REDO = "write it again with `vggnorm apply`, or give verify the statistics (--stats), whose policy is used then"

# apply's own fields of the recorded ``policy``; the others are the measurement policy (Measurement.as_attrs)
_CHOICES = ("rel_eps", "eps", "include_classifier", "weighting", "label_source", "stream_scale")
# fields of the record that hold JSON in the .safetensors metadata (its values are strings)
_JSON_FIELDS = ("provenance_version", "policy", "measurement")


@dataclass(frozen=True)
class Normalization:
    """How apply chose the scales. ``preprocess``: the measurement policy it folded under, as
    ``Measurement.as_attrs`` wrote it (read by ``Measurement.from_attrs``); ``stream_scale``: how a residual
    stream's sites share a scale, ``None`` for a model with no residual stream."""

    preprocess: Mapping[str, object] = field(default_factory=dict)
    rule: DeadRule = DeadRule()
    include_classifier: bool = False
    weighting: Weighting = Weighting.IMAGE
    label_source: str = ""  # with class weighting: "folders" or the labels file
    stream_scale: StreamScale | None = None


@dataclass(frozen=True)
class Provenance:
    """What a normalized checkpoint was made from and how (``version``: of this record's fields)."""

    arch: str
    normalization: Normalization
    measurement: MeasurementRecord | None = None  # the statistics' record; None in a record written before it had one
    layout: Layout = Layout.TORCHVISION
    original: str = ""  # the weights folded, as given (WEIGHTS)
    original_sha256: str = ""
    stats: str = ""  # the statistics file, as given
    created: str = ""  # UTC, ISO 8601
    vggnorm_version: str = ""
    version: int = PROVENANCE_VERSION


def record_fields(p: Provenance) -> dict[str, object]:
    """``p`` as named fields: the report's ``inputs`` hold them as they are, the ``.safetensors`` metadata
    as strings (``to_metadata``)."""
    n = p.normalization
    policy = {
        **n.preprocess,
        "rel_eps": n.rule.rel_eps,
        "eps": n.rule.eps,
        "include_classifier": n.include_classifier,
        "weighting": str(n.weighting),
        "label_source": n.label_source,
        **({"stream_scale": str(n.stream_scale)} if n.stream_scale is not None else {}),
    }
    return {
        "provenance_version": p.version,
        "arch": p.arch,
        "layout": str(p.layout),
        "original": p.original,
        "original_sha256": p.original_sha256,
        "stats": p.stats,
        "policy": policy,
        **({"measurement": measurement_attrs(p.measurement)} if p.measurement is not None else {}),
        "created": p.created,
        "vggnorm_version": p.vggnorm_version,
    }


def to_metadata(p: Provenance) -> dict[str, str]:
    """``p`` as ``.safetensors`` metadata: text fields as they are, the others as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in record_fields(p).items()}


def from_metadata(meta: Mapping[str, str], where: str) -> Provenance | None:
    """The record in a ``.safetensors`` file's metadata; None when it holds none (no ``policy``)."""
    if "policy" not in meta:
        return None
    fields: dict[str, object] = dict(meta)
    for key in _JSON_FIELDS:
        if key in meta:
            try:
                fields[key] = json.loads(meta[key])
            except ValueError as e:
                raise StatsFileError(f"{where}: {key} is not JSON ({e}): {REDO}") from e
    return read_record(fields, where)


def from_report(report: object, where: str) -> Provenance | None:
    """The record in a report apply wrote (its ``inputs``, and its ``arch``); None when ``report`` is not one
    (verify's own reports describe their policy in words)."""
    if not isinstance(report, dict):
        return None
    inputs = report.get("inputs")
    if not isinstance(inputs, dict):
        return None
    if not isinstance(inputs.get("policy"), dict) and "provenance_version" not in inputs:
        return None  # verify's report (its policy in words), or none at all; apply's record is versioned
    return read_record({"arch": report.get("arch", ""), **inputs}, where)


def read_record(fields: Mapping[str, object], where: str) -> Provenance:
    """The record in ``fields`` (``record_fields``' form), every field read through its reader; a field a
    record of version 1 leaves out reads as its default."""
    version = fields.get("provenance_version", PROVENANCE_VERSION)
    if type(version) is not int or version != PROVENANCE_VERSION:
        raise StatsFileError(
            f"{where}: provenance_version is {version!r}; this vggnorm reads version {PROVENANCE_VERSION}: "
            f"use the vggnorm that wrote it, or {REDO}"
        )
    header = check_fields(dict(fields), RECORD_SCHEMA, where, REDO)
    policy = check_fields(fields.get("policy"), RECORDED_POLICY_SCHEMA, f"{where}: policy", REDO)
    measurement = None
    if "measurement" in fields:
        measurement = read_measurement(fields["measurement"], f"{where}: measurement", REDO)
    d = Normalization()
    normalization = Normalization(
        preprocess=policy_values(policy, [k for k in policy if k not in _CHOICES]),
        rule=DeadRule(rel_eps=policy.get("rel_eps", d.rule.rel_eps), eps=policy.get("eps", d.rule.eps)),
        include_classifier=policy.get("include_classifier", d.include_classifier),
        weighting=Weighting(policy.get("weighting", d.weighting)),
        label_source=policy.get("label_source", d.label_source),
        stream_scale=StreamScale(policy["stream_scale"]) if "stream_scale" in policy else None,
    )
    return Provenance(
        arch=header.get("arch", ""),
        normalization=normalization,
        measurement=measurement,
        layout=Layout(header.get("layout", Layout.TORCHVISION)),
        original=header.get("original", ""),
        original_sha256=header.get("original_sha256", ""),
        stats=header.get("stats", ""),
        created=header.get("created", ""),
        vggnorm_version=header.get("vggnorm_version", ""),
    )
