"""The measurement policy: how images become the network's input and which filters are dead.

``compute-stats`` records it in the statistics file; ``apply`` records it with its output (the
``.safetensors`` metadata, or the report beside a ``.pth``); ``verify`` resolves it from those, in
that order, and options override what was recorded (``resolve_policy``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vggnorm.core.fold import DeadRule
from vggnorm.core.stats import Stats
from vggnorm.defaults import DEFAULT_EPS, DEFAULT_REL_EPS, DEFAULT_STREAM_SCALE
from vggnorm.errors import InputError, UsageError
from vggnorm.io import data as data_mod
from vggnorm.io.report import report_paths
from vggnorm.io.statsfile import RECORDED_POLICY_SCHEMA, check_fields


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


def recorded_policy(checkpoint: Path) -> tuple[dict[str, object], str] | None:
    """The measurement policy and dead rule ``apply`` recorded with ``checkpoint``, and where from:
    the ``.safetensors`` metadata, or the report written beside a ``.pth`` (``OUT.report.json``)."""
    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(checkpoint), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # an unreadable file is reported by the loader, with its reason
            return None
        if "policy" in meta:
            where = f"{checkpoint} (safetensors metadata)"
            try:
                policy = json.loads(meta["policy"])
            except ValueError as e:
                raise InputError(f"{where}: policy is not JSON ({e}): {_REDO}") from e
            return _checked(policy, where), where
        return None
    report = report_paths(report_base(checkpoint))[0]
    if report.is_file():
        try:
            policy = json.loads(report.read_text()).get("inputs", {}).get("policy")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(policy, dict):
            return _checked(policy, str(report)), str(report)
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


_REDO = "write it again with `vggnorm apply`, or give verify the statistics (--stats), whose policy is used then"


def _checked(policy: object, where: str) -> dict[str, object]:
    """The recorded policy through the schema apply writes it with (``stats.RECORDED_POLICY_SCHEMA``)."""
    return check_fields(policy, RECORDED_POLICY_SCHEMA, f"{where}: policy", _REDO)


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
    recorded = recorded_policy(normalized_path)
    rec = recorded[0] if recorded else {}
    if stats is not None:
        preprocess = data_mod.Preprocess.from_attrs(stats.attrs)
        for name, value in given.items():
            if value is not None and value != getattr(preprocess, name):
                raise UsageError(
                    f"--{name} {value} differs from the statistics' {name} {getattr(preprocess, name)}; "
                    "leave it out: with --stats, verify measures as compute-stats did"
                )
        source = "the statistics file"
    elif recorded:
        preprocess = replace(data_mod.Preprocess.from_attrs(rec), **{k: v for k, v in given.items() if v is not None})
        source = recorded[1] + (", overridden by options" if any(v is not None for v in given.values()) else "")
    else:
        options = {k: v for k, v in given.items() if v is not None}
        native = _native_preprocess(normalized_path, options.get("preprocess"))
        preprocess = data_mod.default_preprocess(arch, **{**native, **options})
        source = ("the file's own preprocessing, " if native else "") + "defaults"
        source += " and options" if options else ""
    rule = DeadRule(
        rel_eps=rel_eps if rel_eps is not None else float(rec.get("rel_eps", DEFAULT_REL_EPS)),  # type: ignore[arg-type]
        eps=eps if eps is not None else float(rec.get("eps", DEFAULT_EPS)),  # type: ignore[arg-type]
    )
    fc = include_classifier if include_classifier is not None else bool(rec.get("include_classifier", False))
    weighting = weighting or str(rec.get("weighting", "image"))
    label_source = labels or str(rec.get("label_source", "") or (stats.attrs.get("label_source", "") if stats else ""))
    stream_scale = stream_scale or str(rec.get("stream_scale", DEFAULT_STREAM_SCALE))
    return Policy(preprocess, rule, fc, source, weighting, label_source or "folders", stream_scale)
