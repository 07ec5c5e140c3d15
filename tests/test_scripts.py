"""The shell scripts' embedded Python (``make demo``, the GPU benchmark) imports what the package has.

Python inside a shell string is invisible to ruff, mypy and the import contracts, so a module that moves
breaks ``make demo`` silently; this reads every ``from vggnorm... import ...`` in scripts/*.sh and the
Makefile and imports it.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"from (vggnorm(?:\.\w+)*) import ([\w, ]+)")
FILES = sorted(ROOT.glob("scripts/*.sh")) + [ROOT / "Makefile"]


def _imports() -> list[tuple[str, str, str]]:
    out = []
    for path in FILES:
        for module, names in IMPORT.findall(path.read_text()):
            out += [(path.name, module, n.strip()) for n in names.split(",") if n.strip()]
    return out


def test_the_scripts_import_something():
    assert any(f == "demo.sh" for f, _, _ in _imports())


@pytest.mark.parametrize(("file", "module", "name"), _imports())
def test_each_import_in_a_shell_script_resolves(file, module, name):
    assert hasattr(importlib.import_module(module), name), f"{file}: from {module} import {name}"
