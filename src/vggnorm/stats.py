"""Per-filter ReLU statistics: float64 sums and integer counts per layer, merge, HDF5 read/write.

Sums and counts are kept (not only means) so that partial results merge exactly. The HDF5 schema
(``format = "vggnorm.stats"``, ``format_version = 1``) is documented in the README and readable
with plain ``h5py`` or ``h5dump``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from vggnorm.checkpoint import atomic_write
from vggnorm.errors import StatsFileError

FORMAT = "vggnorm.stats"
FORMAT_VERSION = 1


@dataclass
class LayerStats:
    """Sums of one conv's ReLU output per filter, over ``count`` = images x positions."""

    conv: str
    relu: str
    bn: str | None
    sum: torch.Tensor  # (C,) float64
    count: int

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count if self.count else torch.full_like(self.sum, float("nan"))


@dataclass
class Stats:
    """The statistics of one run plus its provenance (``attrs``) and the files it skipped."""

    layers: dict[str, LayerStats]  # keyed by conv module path, in forward order
    num_images: int
    attrs: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    complete: bool = True
    position: int = 0  # files consumed so far (for --resume)

    @property
    def layer_order(self) -> list[str]:
        return list(self.layers)

    def means(self) -> dict[str, torch.Tensor]:
        return {name: layer.mean for name, layer in self.layers.items()}

    def merge(self, other: Stats) -> Stats:
        """Exact sum of two disjoint measurements of the same layers."""
        if self.layer_order != other.layer_order:
            raise StatsFileError("cannot merge statistics of different layers")
        layers = {
            n: LayerStats(a.conv, a.relu, a.bn, a.sum + other.layers[n].sum, a.count + other.layers[n].count)
            for n, a in self.layers.items()
        }
        return Stats(layers, self.num_images + other.num_images, dict(self.attrs), self.skipped + other.skipped)


def _attr(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float)) for v in value) and value:
            return np.asarray(value, dtype=np.float64)
        return json.dumps(list(value))
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)  # plain str: version strings are str subclasses h5py cannot store
    return value


def write_stats(stats: Stats, path: Path, *, force: bool) -> None:
    """Write ``stats`` to ``path`` atomically (temp file + rename)."""
    with atomic_write(Path(path), force=force) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in stats.attrs.items():
            f.attrs[key] = _attr(value)
        f.attrs["num_images"] = stats.num_images
        f.attrs["num_skipped"] = len(stats.skipped)
        f.attrs["complete"] = stats.complete
        f.attrs["position"] = stats.position
        f.attrs["layer_order"] = json.dumps(stats.layer_order)
        layers = f.create_group("layers")
        for name, layer in stats.layers.items():
            g = layers.create_group(name)
            g.create_dataset("sum", data=layer.sum.double().cpu().numpy())
            g.create_dataset("count", data=np.int64(layer.count))
            g.create_dataset("mean", data=layer.mean.double().cpu().numpy())
            g.attrs["relu"] = layer.relu
            if layer.bn is not None:
                g.attrs["bn"] = layer.bn
        skipped = f.create_group("skipped")
        str_dt = h5py.string_dtype()
        skipped.create_dataset("path", data=np.array([p for p, _ in stats.skipped], dtype=object), dtype=str_dt)
        skipped.create_dataset("reason", data=np.array([r for _, r in stats.skipped], dtype=object), dtype=str_dt)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [float(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_stats(path: str | Path, *, allow_incomplete: bool = False) -> Stats:
    """Read a stats file, checking its format; an unfinished run is refused unless ``allow_incomplete``."""
    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"statistics file {path} does not exist; create it with `vggnorm compute-stats`")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StatsFileError(f"{path} is not an HDF5 file ({e}); give a file written by `vggnorm compute-stats`") from e
    try:
        with f:
            if _decode(f.attrs.get("format")) != FORMAT:
                raise StatsFileError(f"{path} is an HDF5 file but not a vggnorm statistics file (no format={FORMAT!r})")
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise StatsFileError(
                    f"{path} has format_version {version}; this vggnorm reads version {FORMAT_VERSION}"
                )
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
            complete = bool(attrs.pop("complete", True))
            position = int(attrs.pop("position", 0))
            num_images = int(attrs.pop("num_images"))
            attrs.pop("num_skipped", None)
            order = json.loads(attrs.pop("layer_order"))
            layers = {}
            for name in order:
                g = f["layers"][name]
                layers[name] = LayerStats(
                    conv=name,
                    relu=_decode(g.attrs["relu"]),
                    bn=_decode(g.attrs["bn"]) if "bn" in g.attrs else None,
                    sum=torch.from_numpy(np.asarray(g["sum"][()], dtype=np.float64)),
                    count=int(g["count"][()]),
                )
            paths = [_decode(p) for p in f["skipped/path"][()]] if "skipped" in f else []
            reasons = [_decode(r) for r in f["skipped/reason"][()]] if "skipped" in f else []
    except (KeyError, ValueError, TypeError) as e:
        raise StatsFileError(
            f"{path} is a damaged vggnorm statistics file ({type(e).__name__}: {e}); measure it again"
        ) from e
    if not complete and not allow_incomplete:
        raise StatsFileError(
            f"{path} is an unfinished run ({position} of {attrs.get('num_files', '?')} files done); "
            "finish it with `vggnorm compute-stats ... --resume` using the same arguments"
        )
    return Stats(layers, num_images, attrs, list(zip(paths, reasons, strict=True)), complete, position)
