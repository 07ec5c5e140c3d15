"""The one type every layer passes around: a checkpoint's tensors by key."""

from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]
