"""vggnorm: rescale a pretrained VGG so every conv filter's mean ReLU activation is 1.

The network computes the same function afterwards (its logits do not change). This is the
normalization Gatys, Ecker and Bethge used for neural style transfer.

Pipeline, one module per stage (data flows one way)::

    data -> collect -> stats -> normalize -> apply (layouts, checkpoint) -> checks -> report
    compute.py, apply.py and verify.py run the three commands; api.py is the Python API; cli.py
    is the command line's front door.

``import vggnorm`` is cheap: the API functions (``measure_means``, ``measure_folder``,
``normalize_model``, ``verify_models``, ``scales``) are imported from ``vggnorm.api`` on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("DeadRule", "analyze", "measure_folder", "measure_means", "normalize_model", "scales", "verify_models")


def __getattr__(name: str) -> Any:
    if name in _API:
        from vggnorm import api

        return getattr(api, name)
    raise AttributeError(f"module 'vggnorm' has no attribute {name!r}")


__all__ = ["__version__", *_API]
