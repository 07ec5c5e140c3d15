"""MkDocs hooks (mkdocs.yml ``hooks:``): the docs' tables that are generated from the code and the schema,
so that they cannot drift from them.

A page holds a marker, an HTML comment, where a table goes:

- ``<!-- generated: stats-schema -->``: the statistics file's fields, from docs/reference/stats-schema-v1.json;
- ``<!-- generated: package-layout -->``: every module of src/vggnorm with the first sentence of its docstring;
- ``<!-- generated: exit-statuses -->``: the kinds of error of ``vggnorm.errors``, each with its exit status,
  what the user must do, and its subclasses.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "docs" / "reference" / "stats-schema-v1.json"
PACKAGE = ROOT / "src" / "vggnorm"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _kind(spec: dict[str, Any]) -> str:
    if "const" in spec:
        return f"`{json.dumps(spec['const'])}`"
    if "enum" in spec:
        return "one of " + ", ".join(f"`{v}`" for v in spec["enum"])
    kind = spec.get("type", "")
    if kind == "array":
        return f"{spec.get('minItems', '')} {spec['items']['type']}s"
    if spec.get("contentMediaType") == "application/json":
        return "string (JSON)"
    low, high = spec.get("minimum"), spec.get("maximum")
    if low is not None:
        return f"{kind} >= {low}" + (f", <= {high}" if high is not None else "")
    return kind


def _dataset(spec: dict[str, Any]) -> str:
    dtype = spec["properties"]["dtype"]
    dims = spec["properties"]["shape"]["minItems"]
    kinds = dtype.get("const") or " or ".join(dtype["enum"])
    return f"{kinds}, {dims} dim{'s' if dims != 1 else ''}" if dims else f"{kinds} scalar"


def stats_schema_table() -> str:
    schema = json.loads(SCHEMA.read_text())
    attrs = schema["properties"]["attrs"]
    required = set(attrs["required"])
    rows = ["| root attribute | type | meaning |", "| --- | --- | --- |"]
    for name, spec in attrs["properties"].items():
        req = " (required)" if name in required else ""
        rows.append(f"| `{name}`{req} | {_cell(_kind(spec))} | {_cell(spec['description'])} |")
    layer = schema["properties"]["layers"]["additionalProperties"]
    rows += ["", "| member | type | meaning |", "| --- | --- | --- |"]
    for name, spec in layer["properties"]["attrs"]["properties"].items():
        rows.append(f"| `layers/<path>` attribute `{name}` | {_kind(spec)} | {_cell(spec['description'])} |")
    for name, spec in layer["properties"].items():
        if name != "attrs":
            rows.append(f"| `layers/<path>/{name}` | {_dataset(spec)} | {_cell(spec['description'])} |")
    for group in ("skipped", "dataset"):
        for name, spec in schema["properties"][group]["properties"].items():
            if name != "attrs":
                rows.append(f"| `{group}/{name}` | {_dataset(spec)} | {_cell(spec['description'])} |")
    return "\n".join(rows)


def _first_sentence(doc: str | None) -> str:
    text = " ".join((doc or "").split("\n\n", 1)[0].split())
    match = re.match(r"(.+?\.)(\s|$)", text)
    return (match.group(1) if match else text).replace("``", "`") or "(no docstring)"


def package_layout_table() -> str:
    rows = ["| module | what it is (its docstring's first sentence) |", "| --- | --- |"]
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        doc = ast.get_docstring(ast.parse(path.read_text()))
        rows.append(f"| `{module}` | {_cell(_first_sentence(doc))} |")
    return "\n".join(rows)


def exit_status_table() -> str:
    import inspect

    from vggnorm import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.VggnormError)]
    rows = ["| exit status | what to do | error | for example |", "| --- | --- | --- | --- |"]
    for kind in errors.KINDS:
        what, _, examples = " ".join((kind.__doc__ or "").split("\n\n")[0].split()).partition(": ")
        subclasses = sorted(c.__name__ for c in classes if c is not kind and issubclass(c, kind))
        names = ", ".join(f"`{n}`" for n in (kind.__name__, *subclasses))
        rows.append(f"| {kind.exit_status} | {_cell(what)} | {names} | {_cell(examples.replace('``', '`'))} |")
    return "\n".join(rows)


GENERATED = {
    "stats-schema": stats_schema_table,
    "package-layout": package_layout_table,
    "exit-statuses": exit_status_table,
}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return re.sub(r"<!-- generated: ([a-z-]+) -->", lambda m: GENERATED[m.group(1)](), markdown)
