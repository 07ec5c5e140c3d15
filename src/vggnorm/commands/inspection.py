"""``inspect``: what the structural analysis finds in a model, without touching data.

Every site (path, activation, norm, channels), where its scale flows and which layer compensates
it, and every refusal with its reason and fix. The same analysis (``analysis.topology.find_topology``) that
compute-stats, apply and verify run, so what ``inspect`` accepts they accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vggnorm.analysis.topology import Site, Topology
from vggnorm.io.models import topology


@dataclass
class Inspection:
    model: str
    topology: Topology
    weights: str = ""  # what the --weights check found

    @property
    def normalizable(self) -> bool:
        return not self.topology.refusals and bool(self.topology.sites)

    def flows(self, site: Site) -> str:
        """Where ``site``'s scale goes: the layers that compensate it, and through what."""
        stream = self.topology.stream_of(site.conv)
        if stream is not None:
            return f"stream {self.topology.streams.index(stream) + 1} (below)"
        readers = [c for c in self.topology.compensations if site.conv in c.sites]
        parts = []
        for c in readers:
            via = f" via {', '.join(c.via)}" if c.via else ""
            how = []
            if c.positions > 1:
                how.append(f"{c.positions} columns per channel")
            if c.groups > 1:
                how.append(f"{c.groups} groups")
            if len(c.pieces) > 1:
                how.append(f"channels {_offset(c, site.conv)} of its {sum(n for _, n in c.pieces)} inputs")
            parts.append(f"{c.module}{via}" + (f" ({', '.join(how)})" if how else ""))
        parts += [
            f"{a.module} (absorbed by the BatchNorm)" for a in self.topology.absorbs if site.conv in _keys(a.runs)
        ]
        if not parts:
            return "-"
        return "; ".join(parts)

    def lines(self) -> list[str]:
        topo = self.topology
        n_conv, n_fc = len(topo.sites), len(topo.fc_sites)
        verdict = "normalizable" if self.normalizable else "NOT normalizable"
        out = [f"{self.model}: {n_conv} conv site(s), {n_fc} fc site(s): {verdict}"]
        if self.weights:
            out.append(f"weights: {self.weights}")
        if topo.all_sites:
            header = ("site", "name", "activation", "norm", "in", "out", "scale compensated by")
            rows = [header]
            for s in topo.all_sites:
                norm = f"{s.bn} ({s.norm}{', --add-affine' if s.added_affine else ''})" if s.bn else "-"
                name = topo.names.get(s.conv, "fc" if s.kind == "linear" else "")
                rows.append(
                    (
                        s.conv,
                        name,
                        f"{s.relu} ({s.activation})",
                        norm,
                        str(s.in_channels),
                        str(s.out_channels),
                        self.flows(s),
                    )
                )
            widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
            out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]
        labels = {site.conv: site.relu for site in topo.all_sites}
        for i, stream in enumerate(topo.streams, 1):
            out.append(
                f"stream {i}: {len(stream.sites)} sites share one scale per channel (joined by residual adds; "
                f"apply --stream-scale chooses it): {', '.join(labels[k] for k in stream.sites)}"
            )
            out.append(f"    divided at {', '.join(stream.writers)}; read by {', '.join(stream.readers) or '-'}")
        if topo.fc_sites:
            out.append("fc sites are normalized only with --include-classifier (compute-stats and apply)")
        if topo.left_unscaled:
            out.append(
                f"left unscaled: {', '.join(topo.left_unscaled)} (its output reaches the model's output with no layer "
                "after it to compensate a scale)"
            )
        if topo.sites and not topo.refusals:
            out.append("output: unchanged")
        if topo.not_sites:
            shown = ", ".join(topo.not_sites[:4]) + (
                f" and {len(topo.not_sites) - 4} more" if len(topo.not_sites) > 4 else ""
            )
            out.append(
                f"not normalized: {len(topo.not_sites)} activation(s) whose input is no conv's output (a residual "
                f"sum, the image): {shown}"
            )
        # one line per kind of refusal: the same reason at 35 nodes is said once, naming the others
        kinds: dict[tuple[str, str], list[str]] = {}
        for r in topo.refusals:
            kinds.setdefault((r.reason.split(":")[0], r.fix), []).append(r.node)
        first = {r.node: r.reason for r in reversed(topo.refusals)}
        for (_, fix), nodes in kinds.items():
            reason = first[nodes[0]]
            more = ""
            if len(nodes) > 1:
                shown = ", ".join(nodes[1:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
                more = f"\n    the same at {len(nodes) - 1} other node(s): {shown}"
            out.append(f"REFUSED {nodes[0]}: {reason}" + more + (f"\n    fix: {fix}" if fix else ""))
        if not topo.sites and not topo.refusals:
            out.append("REFUSED: no Conv2d -> (norm) -> ReLU/LeakyReLU/PReLU site found")
        return out

    def as_dict(self) -> dict[str, Any]:
        topo = self.topology
        return {
            "model": self.model,
            "normalizable": self.normalizable,
            "sites": [
                {**vars(s), "name": topo.names.get(s.conv, ""), "compensated_by": self.flows(s)} for s in topo.all_sites
            ],
            "streams": [
                {"sites": list(st.sites), "writers": list(st.writers), "readers": list(st.readers)}
                for st in topo.streams
            ],
            "left_unscaled": list(topo.left_unscaled),
            "not_sites": list(topo.not_sites),
            "refusals": [vars(r) for r in topo.refusals],
        }


def _offset(c: Any, site: str) -> str:
    start = 0
    for p, n in c.pieces:
        if p == site:
            return f"{start}..{start + n - 1}"
        start += n
    return "?"


def inspect_model(arch: str, *, weights: str | None = None, add_affine: bool = False) -> Inspection:
    """The analysis of ``arch`` (a torchvision name, or a user model imported with ``--model``);
    with ``weights`` (a file, a torchvision weights name or ``random:SEED``), also whether they fit it (keys, shapes, finite values)."""
    from vggnorm.io.weights import INSPECT, resolve_weights

    result = Inspection(arch, topology(arch, add_affine))
    if weights is not None:
        w = resolve_weights(weights, arch=arch, given=INSPECT)
        kind = f"; {w.foreign.describe()}" if w.foreign is not None else ""
        result.weights = f"{weights} fits {arch} ({len(w.state_dict)} tensors, sha256 {w.sha256[:12]}{kind})"
    return result


def _keys(runs: Any) -> set[str]:
    return {k for k, _, _ in runs if k is not None}
