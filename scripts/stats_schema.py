"""Validate vggnorm statistics files against their published schema, docs/reference/stats-schema-v1.json.

The schema is a JSON Schema of the file's JSON view: the root attributes under ``attrs``, each group an
object (its attributes under ``attrs``, its members by name), each dataset ``{"dtype", "shape"}``;
text is ``str``, numbers and booleans are JSON's, arrays are lists. ``describe`` gives that view
(plain h5py, no vggnorm), ``validate`` lists what does not match. The tests validate every file the
docs' examples write; tests/test_docs.py also holds the schema to the code's own reader (``vggnorm.io.statsfile``).

Usage: python scripts/stats_schema.py STATS.h5...   (exit 0: every file matches; 1: one does not)
       python scripts/stats_schema.py --show STATS.h5   (print the JSON view)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "docs" / "reference" / "stats-schema-v1.json"


def _value(v: Any) -> Any:
    if isinstance(v, bytes | np.bytes_):
        return bytes(v).decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_value(x) for x in v.tolist()] if v.dtype.kind != "O" else [_value(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _dtype(ds: h5py.Dataset) -> str:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return "string"
    base = h5py.check_vlen_dtype(ds.dtype)
    if base is not None:
        return "bytes" if base == np.uint8 else f"vlen {base}"
    return str(ds.dtype)


def _node(obj: h5py.Group) -> dict[str, Any]:
    out: dict[str, Any] = {"attrs": {k: _value(obj.attrs[k]) for k in obj.attrs}}
    for name in obj:
        link = obj.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            out[name] = {"link": type(link).__name__}  # no schema allows it: soft and external links are refused
            continue
        child = obj[name]
        out[name] = (
            _node(child) if isinstance(child, h5py.Group) else {"dtype": _dtype(child), "shape": list(child.shape)}
        )
    return out


def describe(path: str | Path) -> dict[str, Any]:
    """The JSON view of the HDF5 file at ``path`` that the schema describes."""
    with h5py.File(path, "r") as f:
        return _node(f)


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


def validate(path: str | Path) -> list[str]:
    """What in ``path`` does not match the schema, one line each (empty: it matches)."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(describe(path)), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--show", action="store_true", help="print each file's JSON view instead")
    a = ap.parse_args()
    bad = 0
    for path in a.files:
        if a.show:
            print(json.dumps(describe(path), indent=2))
            continue
        problems = validate(path)
        bad += bool(problems)
        print(f"{path}: {'matches' if not problems else 'does NOT match'} {SCHEMA.name}")
        for line in problems:
            print(f"  {line}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
