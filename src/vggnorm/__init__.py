"""vggnorm: rescale a pretrained VGG so every conv filter's mean ReLU activation is 1.

The network computes the same function afterwards (its logits do not change). This is the
normalization Gatys, Ecker and Bethge used for neural style transfer.

Pipeline, one module per stage::

    data.py -> collect.py -> stats.py -> normalize.py -> checkpoint.py -> verify.py
"""

from __future__ import annotations

__version__ = "0.1.0"
