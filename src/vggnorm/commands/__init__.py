"""The commands: each reads its inputs, calls the core, and writes its outputs."""
