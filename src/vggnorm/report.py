"""The report of apply and verify: what was checked, with what, and the per-layer figures.

Written as JSON (for scripts) and Markdown (for people), atomically, beside the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vggnorm.checkpoint import atomic_write
from vggnorm.checks import PASS, Check
from vggnorm.normalize import live_filters


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

    @property
    def passed(self) -> bool:
        ran = [c for c in self.checks if c.ran]
        return bool(ran) and all(c.status == PASS for c in ran)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2)

    def to_markdown(self) -> str:
        lines = [
            f"# vggnorm report: {self.checkpoint}",
            "",
            f"Architecture: `{self.arch}`. Result: **{'PASS' if self.passed else 'FAIL'}**.",
            "",
        ]
        lines += [f"- {k}: `{v}`" for k, v in self.inputs.items()]
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
            lines.append(f"| {c.name}: {c.description} | {c.status} | {fig} | {tol} | {c.detail} |")
        if self.measured:
            lines += [
                "",
                "## Measured means per layer (live filters)",
                "",
                "| layer | filters | live | min | median | max |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            lines += [
                f"| {m['layer']} | {m['filters']} | {m['live']} | {m['min']:.4g} | {m['median']:.4g} | {m['max']:.4g} |"
                for m in self.measured
            ]
        if self.figure:
            lines += ["", "## Filter means per layer", "", f"![filter means before and after]({self.figure})"]
        if self.layers:
            lines += [
                "",
                "## Scales per layer",
                "",
                "| layer | filters | min scale | median | max scale | dead filters |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for layer in self.layers:
                dead = ", ".join(map(str, layer["dead"][:20])) + (" ..." if len(layer["dead"]) > 20 else "")
                lines.append(
                    f"| {layer['conv']} | {layer['filters']} | {layer['min']:.4g} | {layer['median']:.4g} | "
                    f"{layer['max']:.4g} | {len(layer['dead'])}{': ' + dead if dead else ''} |"
                )
        return "\n".join(lines) + "\n"


def layer_summary(scales: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per layer: filter count, min/median/max scale over live filters, dead filter indices."""
    out = []
    for name, ls in scales.items():
        s = ls.scale
        live = torch.ones_like(s, dtype=torch.bool)
        live[ls.dead] = False
        v = s[live] if live.any() else s
        out.append(
            {
                "conv": name,
                "filters": s.numel(),
                "min": float(v.min()),
                "median": float(v.median()),
                "max": float(v.max()),
                "dead": list(ls.dead),
            }
        )
    return out


def measured_summary(
    means: Mapping[str, torch.Tensor], dead: Mapping[str, list[int]] | None, *, eps: float
) -> list[dict[str, Any]]:
    """Per layer: filter count, live filters, min/median/max of their measured means."""
    out = []
    for name, mean in means.items():
        m = mean.double()
        live = live_filters(m, eps=eps) if dead is None else torch.ones_like(m, dtype=torch.bool)
        if dead is not None:
            live[dead[name]] = False
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
    json_path, md_path = report_paths(path)
    with atomic_write(json_path, force=force) as tmp:
        tmp.write_text(report.to_json())
    with atomic_write(md_path, force=force) as tmp:
        tmp.write_text(report.to_markdown())
    return json_path, md_path
