"""vggnorm: rescale a pretrained VGG so every conv filter's mean ReLU activation is 1.

The network computes the same function afterwards (its logits do not change). This is the
normalization Gatys, Ecker and Bethge used for neural style transfer.

The package is layered; a module imports only from the layers below its own (``make lint`` checks it)::

    cli | api        the command line and the Python API, two fronts
    commands         compute-stats, apply, verify, compare, centers, inspect: read, call the core, write
    io               checkpoints, weight formats and layouts, statistics files, images, labels, reports
    core             measuring (measure), folding (fold), proving (witness, checks), on models and tensors
    analysis         which activations a model has and what scaling each changes (torch.fx)
    options          the options' named values (StrEnums)
    errors | defaults | version | progress

``import vggnorm`` is cheap: the API functions (``measure_means``, ``measure_folder``,
``normalize_model``, ``verify_models``, ``scales``) are imported from ``vggnorm.api`` on first use.
"""

from __future__ import annotations

from typing import Any

from vggnorm.version import __version__

_API = ("DeadRule", "analyze", "measure_folder", "measure_means", "normalize_model", "scales", "verify_models")


def __getattr__(name: str) -> Any:
    if name in _API:
        from vggnorm import api

        return getattr(api, name)
    raise AttributeError(f"module 'vggnorm' has no attribute {name!r}")


__all__ = ["__version__", *_API]
