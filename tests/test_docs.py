"""The documentation's code blocks run (README.md and docs/), and its generated parts hold to the code.

How the blocks run, and what a block that cannot run here must say: docs/contributing-docs.md. In short:
each page runs in a folder of its own, a copy of a demo folder (the demo's photos, scripts/demo.sh's three
commands) after the README's own blocks; shell commands run in this process through Click's runner, on a
tiny look-alike in place of a torchvision VGG (the suite's time budget); Python blocks run as written.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest

from conftest import TINY
from stats_schema import schema, validate

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
LANGUAGES = {"sh", "console", "python", "yaml", "text"}
MAX_SKIPPED = 10  # blocks that cannot run here (downloads, CUDA, torchrun, full-size networks): keep them few

# the shell commands' rewriting (docs/contributing-docs.md, "Every code block runs in the tests")
TAKES_MODEL = {"compute-stats", "apply", "verify", "compare"}
TAKES_WORKERS = {"compute-stats", "verify"}
DATA_ALIASES = ("val", "ILSVRC2012_img_val")  # image folders of the docs' examples: the demo's photos here
# the commands scripts/demo.sh and the README ran, as run: their outputs are in every page's folder, and a page
# that shows one again (the demo tutorial shows demo.sh's) does not run it a second time
DEMO_SH: list[list[str]] = []
ALREADY_RUN: list[list[str]] = []
RECORD = False  # while the demo folder and the README run


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    title: str = ""
    skip: str | None = None  # the reason, when it cannot run here
    run_steps: bool = False  # a yaml block whose `run:` steps run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    out: list[Block] = []
    lines = page.read_text().splitlines()
    note = None
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)(.*)$", line)
        marker = re.match(r"^<!-- docs-test: (skip|run)\b ?(.*?) ?-->$", line)
        if marker:
            note = marker.groups()
        elif fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            title = re.search(r'title="([^"]+)"', fence.group(2))
            kind, text = note or (None, "")
            out.append(
                Block(
                    page,
                    i + 1,
                    fence.group(1),
                    "\n".join(lines[i + 1 : end]) + "\n",
                    title.group(1) if title else "",
                    text if kind == "skip" else None,
                    kind == "run",
                )
            )
            note, i = None, end
        elif line.strip():
            note = None
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page)]


# --- running a page ------------------------------------------------------------------------------------


def rewrite(args: list[str]) -> list[str]:
    """A documented vggnorm command as the tests run it: the tiny look-alike for a torchvision VGG,
    random weights for torchvision's pretrained ones, no worker processes, no progress bar."""
    command, rest = args[0], args[1:]
    out: list[str] = []
    model = None
    i = 0
    while i < len(rest):
        if rest[i] == "--arch" and command in TAKES_MODEL:
            model = TINY["tiny_bn" if rest[i + 1].endswith("_bn") else "tiny"]
            i += 2
            continue
        word = "random:0" if rest[i] == "IMAGENET1K_V1" else rest[i]
        out.append("demo/photos" if word.rstrip("/") in DATA_ALIASES else word)
        i += 1
    if command in TAKES_MODEL and "--model" not in out:
        out += ["--model", model or TINY["tiny"]]
    if command == "compute-stats" and not {"--resize", "--crop"} & set(out):
        out += ["--resize", "64", "--crop", "64"]
    if command in TAKES_WORKERS:
        out += [] if "--workers" in out else ["--workers", "0"]
        out += [] if {"--progress", "--no-progress"} & set(out) else ["--no-progress"]
    return [command, *out]


def run_command(words: list[str], where: str) -> str:
    """One command line (already split); returns what it printed."""
    from click.testing import CliRunner

    from vggnorm.cli import cli

    redirect = None
    if ">" in words:
        k = words.index(">")
        words, redirect = words[:k], words[k + 1]
    if words[0] == "vggnorm":
        args = rewrite(words[1:])
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
        if RECORD and r.exit_code == 0:
            ALREADY_RUN.append(args)
        if redirect:
            Path(redirect).write_text(r.stdout)
        return f"[exit {r.exit_code}]\n{r.output}"
    if words[0] == "python" and words[1].startswith("scripts/"):
        argv = sys.argv
        sys.argv = words[1:]
        try:
            runpy.run_path(str(ROOT / words[1]), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code or 0
        finally:
            sys.argv = argv
        return f"[exit {code}]\n"
    raise AssertionError(
        f"{where}: cannot run {' '.join(words)!r} here; mark the block <!-- docs-test: skip REASON -->"
    )


def shell_lines(code: str) -> list[str]:
    text = code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == "wait" or line.startswith((". ", "source ")):
            continue
        loop = re.match(r"^for (\w+) in ([^;]+); do (.+?);? done$", line)
        if loop:
            var, values, body = loop.groups()
            out += [re.sub(rf"\$\{{?{var}\}}?", v, body).rstrip(" &") for v in values.split()]
        else:
            out.append(line.rstrip(" &"))
    return out


def run_line(line: str, where: str) -> str:
    expected = re.search(r"#\s*exits (\d+)\s*$", line)
    words = shlex.split(line, comments=True)
    if words and words[0] == "vggnorm" and rewrite(words[1:]) in ALREADY_RUN:
        return "[exit 0]\n"
    if words in DEMO_SH and where != "scripts/demo.sh":
        return "[exit 0]\n"
    output = run_command(words, where)
    status = int(output.split("]", 1)[0].removeprefix("[exit "))
    want = int(expected.group(1)) if expected else 0
    assert status == want, f"{where}: `{line}` exited {status}, expected {want}:\n{output}"
    return output


def run_block(block: Block, namespace: dict) -> None:
    if block.lang == "sh":
        for line in shell_lines(block.code):
            run_line(line, block.where)
    elif block.lang == "console":
        command, expected = None, []
        chunks: list[tuple[str, list[str]]] = []
        for line in block.code.splitlines():
            if line.startswith("$ "):
                if command:
                    chunks.append((command, expected))
                command, expected = line[2:], []
            elif line.strip() and line.strip() != "...":
                expected.append(line)
        if command:
            chunks.append((command, expected))
        for command, lines in chunks:
            printed = " ".join(run_line(command, block.where).split())
            for line in lines:
                assert " ".join(line.split()) in printed, (
                    f"{block.where}: `{command}` did not print {line!r}:\n{printed}"
                )
    elif block.lang == "python":
        if block.title:
            Path(block.title).write_text(block.code)
        else:
            exec(compile(block.code, block.where, "exec"), namespace)
    elif block.lang == "yaml" and block.run_steps:
        import yaml

        steps = [s["run"] for job in yaml.safe_load(block.code)["jobs"].values() for s in job["steps"] if "run" in s]
        ran = [run_line(s, block.where) for s in steps if s.startswith("vggnorm ")]
        assert ran, f"{block.where}: no step calls vggnorm"


def stats_files(folder: Path) -> set[Path]:
    out = set()
    for path in folder.rglob("*.h5"):
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") == "vggnorm.stats":
                    out.add(path)
        except OSError:
            pass
    return out


def run_page(page: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    before = stats_files(folder)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.skip is None:
            run_block(block, namespace)
    for path in sorted(stats_files(folder) - before):  # every statistics file the examples wrote
        problems = validate(path)
        assert not problems, f"{page.relative_to(ROOT)} wrote {path.name}, which does not match the schema: {problems}"


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """What `make demo` leaves, on the tiny look-alike: the photos (smaller), the weights, and
    scripts/demo.sh's own three commands run."""
    import torch

    from vggnorm.io.weights import random_state_dict

    global RECORD
    d = tmp_path_factory.mktemp("docs-demo")
    (d / "demo").mkdir()
    torch.save(random_state_dict(TINY["tiny"], 0), d / "demo" / "vgg19-random0.pth")
    script = (ROOT / "scripts" / "demo.sh").read_text().replace("\\\n", " ")
    commands = [line for line in script.splitlines() if line.startswith(('"$bin/vggnorm"', '"$bin/python" scripts/'))]
    assert len(commands) == 4, commands  # the photos, then compute-stats, apply, verify
    RECORD = True
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        for line in commands:
            line = line.replace('"$bin/vggnorm"', "vggnorm").replace('"$bin/python"', "python")
            line = line.replace('"$out', '"demo').replace('"$arch"', "vgg19").replace("$arch", "vgg19")
            DEMO_SH.append(shlex.split(line))
            run_line(line, "scripts/demo.sh")
    RECORD = False
    return d


@pytest.fixture(scope="session")
def after_readme(demo_folder, tmp_path_factory) -> Path:
    global RECORD
    d = tmp_path_factory.mktemp("docs-readme") / "repo"
    shutil.copytree(demo_folder, d, symlinks=True)
    RECORD = True
    try:
        with pytest.MonkeyPatch.context() as mp:
            run_page(ROOT / "README.md", d, mp)
    finally:
        RECORD = False
    return d


def test_the_readmes_examples_run(after_readme):
    assert (after_readme / "vgg19-normalized.pth").is_file()


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in PAGES[1:]])
def test_the_docs_examples_run(page, after_readme, tmp_path, monkeypatch):
    folder = tmp_path / "repo"
    shutil.copytree(after_readme, folder, symlinks=True)
    run_page(ROOT / page, folder, monkeypatch)


def test_the_demo_tutorial_shows_the_commands_demo_sh_runs(demo_folder):
    shown = [
        shlex.split(line)
        for b in blocks(DOCS / "tutorials" / "demo.md")
        if b.lang == "sh"
        for line in shell_lines(b.code)
    ]
    assert all(command in shown for command in DEMO_SH) and len(DEMO_SH) == 4, (DEMO_SH, shown)


def test_every_block_is_in_a_known_language_and_few_are_skipped():
    found = all_blocks()
    unknown = [f"{b.where} ({b.lang or 'no language'})" for b in found if b.lang not in LANGUAGES]
    assert not unknown, unknown
    skipped = [b for b in found if b.skip is not None]
    assert all(b.skip.strip() for b in skipped), [b.where for b in skipped if not b.skip.strip()]
    assert len(skipped) <= MAX_SKIPPED, [f"{b.where}: {b.skip}" for b in skipped]
    ran = [b for b in found if b.skip is None and b.lang != "text"]
    assert len(ran) >= 2 * len(skipped), (len(ran), len(skipped))


def test_the_readme_is_short_and_names_no_document_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10_500, len(readme.encode())
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text and "SPEC.md" not in text, page
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):  # the README's links into the docs exist
        assert (ROOT / link).is_file(), link


# --- the generated reference holds to the code -----------------------------------------------------------


def test_the_cli_reference_documents_every_command_and_option():
    """The reference page is generated from the Click commands; what it generates names every option."""
    from mkdocs_click._docs import make_command_docs

    from vggnorm.cli import cli

    page = (DOCS / "reference" / "cli.md").read_text()
    assert ":module: vggnorm.cli" in page and ":command: cli" in page and ":list_subcommands: true" in page
    generated = "\n".join(make_command_docs("vggnorm", cli, depth=1, style="table", list_subcommands=True))
    for name, command in cli.commands.items():
        assert f"vggnorm {name}" in generated
        for param in command.params:
            for opt in (*param.opts, *param.secondary_opts):
                if opt.startswith("-"):
                    assert opt in generated, f"{name} {opt} is not in the generated reference"
    docs = "\n".join(p.read_text() for p in PAGES if p.name != "cli.md")
    for name in cli.commands:  # and each command is shown in use somewhere beyond the reference
        assert f"vggnorm {name}" in docs, name


def test_the_published_schema_is_the_readers():
    """docs/reference/stats-schema-v1.json names every field io/statsfile.py reads, with the same values."""
    from vggnorm.defaults import MAX_RESIZE
    from vggnorm.io import statsfile as stats
    from vggnorm.options import Decoder, InputConvention, Interpolation, Padding, Pooling, Precision

    s = schema()
    assert s["$id"].endswith(f":{stats.FORMAT_VERSION}")
    attrs = s["properties"]["attrs"]
    props = attrs["properties"]
    assert props["format"]["const"] == stats.FORMAT and props["format_version"]["const"] == stats.FORMAT_VERSION
    readers = {**stats.ROOT_SCHEMA, **stats._preprocess_fields()}
    assert set(readers) <= set(props), sorted(set(readers) - set(props))
    assert set(attrs["required"]) == set(stats.REQUIRED)
    for key, values in {
        "precision": Precision,
        "preprocess": InputConvention,
        "pooling": Pooling,
        "decode": Decoder,
        "padding": Padding,
        "interpolation": Interpolation,
    }.items():
        assert props[key]["enum"] == [v.value for v in values], key
    assert props["resize"]["maximum"] == props["crop"]["maximum"] == MAX_RESIZE
    layer = s["properties"]["layers"]["additionalProperties"]["properties"]["attrs"]["properties"]
    assert set(layer) == set(stats.LAYER_SCHEMA)


def test_the_schema_refuses_what_the_reader_refuses(after_readme, tmp_path):
    path = tmp_path / "s.h5"
    shutil.copyfile(after_readme / "vgg19-stats.h5", path)
    assert validate(path) == []
    with h5py.File(path, "r+") as f:
        f.attrs["crop"] = "abc"
        f.attrs["no_such_field"] = 1
        del f["layers/features.0/count"]
    problems = "\n".join(validate(path))
    assert "crop" in problems and "no_such_field" in problems and "count" in problems, problems


def test_the_generated_tables_build():
    import mkdocs_hooks

    table = mkdocs_hooks.stats_schema_table()
    assert all(f"`{key}`" in table for key in schema()["properties"]["attrs"]["properties"])
    layout = mkdocs_hooks.package_layout_table()
    for module in (ROOT / "src" / "vggnorm").glob("*.py"):
        assert f"`vggnorm.{module.stem}`" in layout or module.stem == "__init__", module
    assert json.loads((DOCS / "reference" / "stats-schema-v1.json").read_text())["title"]
