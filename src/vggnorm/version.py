"""The package version (one place: the package metadata and every recorded provenance read it)."""

__version__ = "0.1.0"
