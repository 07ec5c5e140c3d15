"""The pure core: measuring, folding and checking, on models, state_dicts and typed values (no files, no data loading)."""
