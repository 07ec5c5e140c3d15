"""The analysis: which activations a model has, and what a per-filter scale of each must change (torch.fx; no data, no files).

``register_module`` and ``register_function`` tell it about a user's own op, with a handler: ``commutes``
(the op keeps each channel's scale in place) or ``not_homogeneous`` (a nonlinearity), or one of one's own.
"""

from vggnorm.analysis.handlers import commutes, not_homogeneous
from vggnorm.analysis.registry import register_function, register_module

__all__ = ["commutes", "not_homogeneous", "register_function", "register_module"]
