"""The report's figure: per layer, the filter means before and after normalization (PNG).

matplotlib is optional (``pip install 'vggnorm[plot]'``); without it no figure is drawn and the
caller says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import IO

import torch


def have_matplotlib() -> bool:
    """Whether matplotlib is installed (found, not imported: importing it costs a tenth of a second)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_means(
    before: Mapping[str, torch.Tensor] | None,
    after: Mapping[str, torch.Tensor],
    dead: Mapping[str, list[int]],
    path: Path | IO[bytes],
    *,
    title: str,
    after_label: str,
    names: Mapping[str, str] | None = None,
) -> None:
    """Per layer, every filter: the means before (log scale, if given), then how far each live filter's
    mean is from 1 after (``|mean - 1|``, log scale, with the means check's tolerance ``1e-3`` dashed).
    Layers are labelled with their module path and, with ``names``, Gatys' name. Dead filters are not
    drawn (their means are no measurement of the normalization): each layer's count is written in red
    under its column. Writes ``path`` directly (or a binary file object): callers write it through
    ``io.checkpoint.atomic_writes``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    layers = list(after)
    panels = [*([(before, "before: filter means (measured)", False)] if before is not None else [])]
    panels.append((after, f"{after_label}: |mean - 1| of each live filter", True))
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(8, 0.55 * len(layers) + 2), 3.75 * len(panels) + 0.5),
        sharex=True,
        squeeze=False,
    )
    axes = axes[:, 0]
    gen = torch.Generator().manual_seed(0)
    for ax, (values, label, deviation) in zip(axes, panels, strict=True):
        below = blended_transform_factory(ax.transData, ax.transAxes)
        worst = 0.0
        for x, name in enumerate(layers):
            v = values[name].double()
            mask = torch.ones_like(v, dtype=torch.bool)
            mask[dead.get(name, [])] = False
            n_dead = int((~mask).sum())
            y = (v - 1).abs().clamp_min(1e-18) if deviation else v
            mask &= y > 0
            if deviation and mask.any():
                worst = max(worst, float(y[mask].max()))
            jitter = (torch.rand(v.numel(), generator=gen) - 0.5) * 0.6
            ax.scatter((x + jitter)[mask], y[mask], s=3, alpha=0.35, color="tab:blue", linewidths=0)
            if n_dead and (not deviation or len(panels) == 1):  # counted once, in the first panel
                ax.text(x, 0.02, f"{n_dead} dead", transform=below, color="tab:red", fontsize=7, ha="center")
        ax.set_yscale("log")
        if deviation and worst < 1e-12:  # exactly 1 up to float64 rounding: no scatter of rounding noise
            ax.cla()
            ax.set_yscale("log")
            ax.set_ylim(1e-13, 1e-2)
            ax.text(
                0.5,
                0.5,
                f"every live filter's mean is 1 within {max(worst, 1e-16):.0e}",
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize=10,
                color="tab:blue",
            )
        if deviation:
            ax.axhline(1e-3, color="gray", lw=0.8, ls="--", label="verify's tolerance (1e-3)")
            ax.set_ylabel("|mean - 1|")
            ax.legend(loc="upper right", fontsize=8)
        else:
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_ylabel("filter mean activation")
        ax.set_title(label, fontsize=10, loc="left")
    ticks = [f"{n} ({names[n]})" if names and n in names else n for n in layers]
    axes[-1].set_xticks(range(len(layers)), ticks, rotation=60, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=110)  # a temporary file of checkpoint.atomic_writes
    finally:
        plt.close(fig)
