"""The report of apply and verify: what was checked, with what, and the per-layer figures.

Written as JSON (for scripts) and Markdown (for people), atomically, beside the checkpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vggnorm.analysis.topology import Topology
from vggnorm.core.checks import FAIL, NOT_RUN, PASS, Check
from vggnorm.core.fold import DeadRule, LayerScales
from vggnorm.io.checkpoint import atomic_writes
from vggnorm.options import StreamScale


@dataclass
class Report:
    """What was checked, with what files, and the per-layer scale summary."""

    checkpoint: str
    arch: str
    checks: list[Check]
    inputs: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    figure: str | None = None  # file name of the PNG beside the report
    measured: list[dict[str, Any]] = field(default_factory=list)  # per layer, the re-measured means
    names: dict[str, str] = field(default_factory=dict)  # conv path -> Gatys name (conv1_1), where known
    streams: list[dict[str, Any]] = field(default_factory=list)  # per residual stream, its sites' promised means

    def label(self, path: str, *, relu: bool = False) -> str:
        """``features.0 (conv1_1)``, or ``(relu1_1)`` for a ReLU output: the names users know."""
        name = self.names.get(path)
        if name is None:
            return path
        return f"{path} ({name.replace('conv', 'relu', 1) if relu else name})"

    @property
    def passed(self) -> bool:
        ran = [c for c in self.checks if c.ran]
        return bool(ran) and all(c.status == PASS for c in ran)

    def to_junit(self) -> str:
        """The checks as JUnit XML, the format pytest's ``--junitxml`` writes and CI systems read: a
        test case per check, and one per layer (or tensor) of a check that measured layers, so a
        failure names its layer. Checks that did not run are skipped."""
        import xml.etree.ElementTree as ET

        suites = ET.Element("testsuites")
        suite = ET.SubElement(suites, "testsuite", name="vggnorm verify")
        counts = {"tests": 0, "failures": 0, "skipped": 0}

        def case(name: str, classname: str, status: str, message: str, text: str) -> None:
            name, message, text = _xml(name), _xml(message), _xml(text)
            element = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")
            counts["tests"] += 1
            if status == NOT_RUN:
                ET.SubElement(element, "skipped", message=message)
                counts["skipped"] += 1
            elif status != PASS:
                ET.SubElement(element, "failure", message=message).text = text
                counts["failures"] += 1

        for c in self.checks:
            figure = "" if c.figure is None else f"{c.figure:.3g} (tolerance {c.tolerance:.3g})"
            case(c.name, "vggnorm.verify", c.status, f"{c.name}: {figure} {c.detail}".strip(), c.detail)
            for layer, value in c.layers.items():
                status = PASS if c.tolerance is not None and value <= c.tolerance else FAIL
                label = self.label(layer) if layer in self.names else layer
                message = f"{c.name} {label}: {value:.3g} (tolerance {c.tolerance:.3g})"
                case(f"{c.name}[{label}]", f"vggnorm.verify.{c.name}", status, message, message)
        suite.set("name", _xml(f"vggnorm verify {self.checkpoint}"))
        for key, value in counts.items():
            suite.set(key, str(value))
        suite.set("errors", "0")
        ET.indent(suites)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"

    def write(self, json_path: Path, md_path: Path) -> None:
        json_path.write_text(self.to_json())
        md_path.write_text(self.to_markdown())

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2)

    def to_markdown(self) -> str:
        lines = [
            f"# vggnorm report: {self.checkpoint}",
            "",
            f"Architecture: `{self.arch}`. Result: **{'PASS' if self.passed else 'FAIL'}**.",
            "",
        ]
        for k, v in self.inputs.items():
            if isinstance(v, dict):  # the policy, the float32 filters: one line each, not a Python dict
                lines.append(f"- {k}:")
                lines += [f"  - {kk}: `{_plain(vv)}`" for kk, vv in v.items()]
            else:
                lines.append(f"- {k}: `{_plain(v)}`")
        lines += [
            "",
            "## Checks",
            "",
            "| check | status | measured | tolerance | detail |",
            "| --- | --- | --- | --- | --- |",
        ]
        for c in self.checks:
            fig = "" if c.figure is None else f"{c.figure:.3g}"
            tol = "" if c.tolerance is None else f"{c.tolerance:.3g}"
            lines.append(f"| {c.name}: {_cell(c.description)} | {c.status} | {fig} | {tol} | {_cell(c.detail)} |")
        if self.measured:
            lines += [
                "",
                "## Measured means per layer (live filters)",
                "",
                "| layer | filters | live | min | median | max |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            lines += [
                f"| {self.label(m['layer'], relu=True)} | {m['filters']} | {m['live']} | {m['min']:.4g} | "
                f"{m['median']:.4g} | {m['max']:.4g} |"
                for m in self.measured
            ]
        if self.streams:
            lines += [
                "",
                "## Residual streams",
                "",
                "The sites of a stream share one scale per channel (chosen by `--stream-scale`), so their means "
                "after normalization are these, not 1; every other site's live means are 1.",
                "",
                "| stream | policy | site | live filters | min mean | median | max mean |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for i, stream in enumerate(self.streams, 1):
                for site in stream["sites"]:
                    lines.append(
                        f"| {i} | {stream['policy']} | {site['site']} | {site['live']} | {site['min']:.4g} | "
                        f"{site['median']:.4g} | {site['max']:.4g} |"
                    )
        if self.figure:
            lines += ["", "## Filter means per layer", "", f"![filter means before and after]({self.figure})"]
        if self.layers:
            lines += [
                "",
                "## Scales per layer",
                "",
                "| layer | filters | min scale | median | max scale | dead filters | near-dead kept (amplification) |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for layer in self.layers:
                dead = ", ".join(map(str, layer["dead"][:20])) + (" ..." if len(layer["dead"]) > 20 else "")
                near = ", ".join(f"{f['filter']} ({f['amplification']:.3g}x)" for f in layer.get("near_dead", [])[:20])
                lines.append(
                    f"| {self.label(layer['conv'])} | {layer['filters']} | {layer['min']:.4g} | {layer['median']:.4g} | "
                    f"{layer['max']:.4g} | {len(layer['dead'])}{': ' + dead if dead else ''} | {near} |"
                )
        return "\n".join(lines) + "\n"


# a live filter is listed as near-dead when its mean is below this many times its layer's dead threshold
NEAR_DEAD_FACTOR = 10.0


# what XML 1.0 cannot hold: control characters but tab and line ends, lone surrogates (an undecodable file name)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    """``text`` with what XML 1.0 cannot hold written as ``\\xNN`` / ``\\uNNNN``: raw, a CI's parser rejects the file."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 256 else f"\\u{ord(m[0]):04x}", text)


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell: its pipes escaped, its lines joined."""
    return " ".join(text.replace("|", "\\|").splitlines())


def _plain(value: object) -> str:
    """A value as a reader writes it: lists and tuples comma-separated, no Python quotes or brackets."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    return str(value)


def layer_summary(scales: Mapping[str, LayerScales]) -> list[dict[str, Any]]:
    """Per layer: filter count, min/median/max scale over live filters, dead filter indices, and the
    live filters within ``NEAR_DEAD_FACTOR`` of the dead threshold with their amplification ``1 / s``."""
    out = []
    for name, ls in scales.items():
        s = ls.scale
        live = torch.ones_like(s, dtype=torch.bool)
        live[ls.dead] = False
        v = s[live] if live.any() else s
        near = torch.nonzero(live & (s < NEAR_DEAD_FACTOR * ls.threshold)).flatten().tolist()
        out.append(
            {
                "conv": name,
                "filters": s.numel(),
                "min": float(v.min()),
                "median": float(v.median()),
                "max": float(v.max()),
                "dead": list(ls.dead),
                "dead_threshold": ls.threshold,
                "near_dead": [{"filter": i, "mean": float(s[i]), "amplification": 1 / float(s[i])} for i in near],
            }
        )
    return out


def stream_summary(topology: Topology, scales: Mapping[str, LayerScales], policy: StreamScale) -> list[dict[str, Any]]:
    """Per residual stream: its sites (activation labels) with the min/median/max of the means their live
    filters have once normalized (``LayerScales.expected``), and the spread (largest over smallest)."""
    labels = {s.conv: s.relu for s in topology.all_sites}
    out = []
    for stream in topology.streams:
        sites, values = [], []
        for key in stream.sites:
            ls = scales.get(key)
            if ls is None or ls.expected is None:
                continue
            live = torch.ones_like(ls.expected, dtype=torch.bool)
            live[ls.dead] = False
            v = ls.expected[live].double()
            if not v.numel():
                continue
            values.append(v)
            sites.append(
                {
                    "site": labels.get(key, key),
                    "key": key,
                    "live": int(v.numel()),
                    "min": float(v.min()),
                    "median": float(v.median()),
                    "max": float(v.max()),
                }
            )
        if sites:
            every = torch.cat(values)
            spread = float(every.max() / every.min()) if float(every.min()) > 0 else float("inf")
            out.append({"policy": str(policy), "sites": sites, "spread": spread, "writers": list(stream.writers)})
    return out


def measured_summary(
    means: Mapping[str, torch.Tensor], dead: Mapping[str, list[int]] | None, *, rule: DeadRule = DeadRule()
) -> list[dict[str, Any]]:
    """Per layer: filter count, live filters, min/median/max of their measured means."""
    out = []
    for name, mean in means.items():
        m = mean.double()
        live = rule.live_given(m, dead[name] if dead is not None else None)
        v = m[live] if live.any() else torch.full((1,), float("nan"), dtype=torch.float64)
        out.append(
            {
                "layer": name,
                "filters": m.numel(),
                "live": int(live.sum()),
                "min": float(v.min()),
                "median": float(v.median()),
                "max": float(v.max()),
            }
        )
    return out


def report_paths(path: Path) -> tuple[Path, Path]:
    """``X.json``/``X.md`` for a report path ``X`` (or ``X.json`` / ``X.md``)."""
    base = path.with_suffix("") if path.suffix in (".json", ".md") else path
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".md")


def write_report(report: Report, path: Path, *, force: bool) -> tuple[Path, Path]:
    """``PATH.json`` and ``PATH.md``, each atomically (``atomic_writes``: the JSON renamed first)."""
    json_path, md_path = report_paths(path)
    with atomic_writes([json_path, md_path], force=force) as (json_tmp, md_tmp):
        report.write(json_tmp, md_tmp)
    return json_path, md_path
