"""The report's figure: per layer, the filter means before and after normalization (PNG).

matplotlib is optional (``pip install 'vggnorm[plot]'``); without it no figure is drawn and the
caller says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_means(
    before: Mapping[str, torch.Tensor] | None,
    after: Mapping[str, torch.Tensor],
    dead: Mapping[str, list[int]],
    path: Path,
    *,
    title: str,
    after_label: str,
    names: Mapping[str, str] | None = None,
) -> None:
    """Scatter of every filter's mean per layer (log scale), before (if given) and after; dead
    filters in red. Layers are labelled with their module path and, with ``names``, Gatys' name.
    Writes ``path`` directly: callers write it through ``checkpoint.atomic_writes``.

    Dead filters (mean 0 or <= eps) cannot sit on a log axis: they are drawn as red crosses on the
    bottom edge, with their count.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(after)
    panels = [*([(before, "before (measured)")] if before is not None else []), (after, after_label)]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(8, 0.55 * len(layers) + 2), 3.75 * len(panels) + 0.5),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    axes = axes[:, 0]
    gen = torch.Generator().manual_seed(0)
    for ax, (values, label) in zip(axes, panels, strict=True):
        live_all = torch.cat([values[n].double()[values[n].double() > 0] for n in layers])
        floor = float(live_all.min()) / 3 if live_all.numel() else 1e-6
        for x, name in enumerate(layers):
            v = values[name].double()
            mask = torch.ones_like(v, dtype=torch.bool)
            mask[dead.get(name, [])] = False
            mask &= v > 0
            jitter = (torch.rand(v.numel(), generator=gen) - 0.5) * 0.6
            ax.scatter((x + jitter)[mask], v[mask], s=3, alpha=0.35, color="tab:blue", linewidths=0)
            n_dead = int((~mask).sum())
            if n_dead:
                ax.scatter([x], [floor], marker="x", color="tab:red", s=30)
                ax.annotate(
                    str(n_dead), (x, floor), textcoords="offset points", xytext=(4, 4), color="tab:red", fontsize=7
                )
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_ylabel("filter mean ReLU activation")
        ax.set_title(label, fontsize=10, loc="left")
    ticks = [f"{n} ({names[n]})" if names and n in names else n for n in layers]
    axes[-1].set_xticks(range(len(layers)), ticks, rotation=60, ha="right", fontsize=8)
    axes[0].scatter([], [], marker="x", color="tab:red", label="dead filters (count)")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=110)  # a temporary file of checkpoint.atomic_writes
    finally:
        plt.close(fig)
