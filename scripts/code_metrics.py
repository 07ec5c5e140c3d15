"""The house's figures: uses of ``Any`` in src/, the longest functions, and the parameters they take.

Usage: python scripts/code_metrics.py [SRC_DIR]   (default: src/vggnorm)
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path


def any_count(path: Path) -> int:
    """How many times the name ``Any`` appears in ``path``'s code (not in comments or strings)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return sum(1 for t in tokens if t.type == tokenize.NAME and t.string == "Any")


def functions(path: Path, root: Path) -> list[tuple[int, int, str]]:
    """(lines, parameters, name) of every function in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            out.append((lines, params, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return out


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "src/vggnorm")
    files = sorted(src.rglob("*.py"))
    anys = sum(any_count(p) for p in files)
    funcs = [f for p in files for f in functions(p, src)]
    print(f"{len(files)} modules, {sum(len(p.read_text().splitlines()) for p in files)} lines, {anys} uses of Any")
    print("longest functions:")
    for lines, params, name in sorted(funcs, reverse=True)[:5]:
        print(f"  {lines:4d} lines  {params:2d} params  {name}")
    print("most parameters:")
    for params, lines, name in sorted(((p, n, m) for n, p, m in funcs), reverse=True)[:3]:
        print(f"  {params:4d} params  {lines:3d} lines  {name}")


if __name__ == "__main__":
    main()
