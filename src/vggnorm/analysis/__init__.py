"""The analysis: which activations a model has, and what a per-filter scale of each must change (torch.fx; no data, no files)."""
