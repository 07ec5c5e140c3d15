"""vggnorm.io.report: what the JSON, Markdown and JUnit XML of a given list of checks say, escaping included,
the per-layer summaries, and how the report files are written; called directly, no command run."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch

from vggnorm.core.checks import FAIL, NOT_RUN, PASS, Check
from vggnorm.core.fold import DeadRule, LayerScales
from vggnorm.errors import OutputExistsError
from vggnorm.io.report import Report, layer_summary, measured_summary, report_paths, write_report

NASTY = "a \"quoted\" <tag> & 'apostrophe' | pipe"


def checks() -> list[Check]:
    return [
        Check("output", "outputs unchanged", PASS, 1e-7, 1e-5, "max over 8 images"),
        Check("activations", "ReLU outputs divided", FAIL, 0.2, 1e-4, "", {"features.0": 1e-6, "features.2": 0.2}),
        Check("means", "re-measured means are 1", NOT_RUN, detail="no --data"),
    ]


def report(cs: list[Check] | None = None, **kw) -> Report:
    kw.setdefault("names", {"features.0": "conv1_1", "features.2": "conv1_2"})
    return Report("out.pth", "vgg11", checks() if cs is None else cs, **kw)


def junit(r: Report) -> ET.Element:
    text = r.to_junit()
    assert text.startswith('<?xml version="1.0" encoding="utf-8"?>\n')
    return ET.fromstring(text.split("\n", 1)[1])


# ---- the verdict -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "passed"),
    [
        ([PASS, PASS], True),
        ([PASS, NOT_RUN], True),
        ([PASS, FAIL], False),
        ([NOT_RUN, NOT_RUN], False),  # nothing checked is no pass
        ([], False),
    ],
)
def test_a_report_passes_when_checks_ran_and_every_one_that_ran_passed(statuses, passed):
    r = report([Check(f"c{i}", "", s) for i, s in enumerate(statuses)])
    assert r.passed is passed
    assert json.loads(r.to_json())["passed"] is passed
    assert f"Result: **{'PASS' if passed else 'FAIL'}**" in r.to_markdown()


# ---- JSON ------------------------------------------------------------------------------------------------


def test_the_json_holds_every_check_as_given_and_the_inputs():
    inputs = {"original": "in.pth", "policy": {"mean": [0.5, 0.5, 0.5]}, "features_only": False}
    data = json.loads(report(inputs=inputs).to_json())
    assert data["checkpoint"] == "out.pth" and data["arch"] == "vgg11" and data["passed"] is False
    assert data["inputs"] == inputs
    assert [c["name"] for c in data["checks"]] == ["output", "activations", "means"]
    act = data["checks"][1]
    assert act == {
        "name": "activations",
        "description": "ReLU outputs divided",
        "status": FAIL,
        "figure": 0.2,
        "tolerance": 1e-4,
        "detail": "",
        "layers": {"features.0": 1e-6, "features.2": 0.2},
    }
    assert data["checks"][2]["figure"] is None and data["checks"][2]["status"] == NOT_RUN


def test_the_json_keeps_any_text_as_it_was():
    r = report([Check("output", NASTY, FAIL, 1.0, 0.1, NASTY + "\n\x01é")], inputs={"original": NASTY})
    data = json.loads(r.to_json())
    assert data["checks"][0]["detail"] == NASTY + "\n\x01é" and data["inputs"]["original"] == NASTY


# ---- JUnit XML -------------------------------------------------------------------------------------------


def test_junit_has_a_case_per_check_and_per_layer_with_the_counts():
    suites = junit(report())
    (suite,) = suites
    assert suite.get("name") == "vggnorm verify out.pth"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == [
        "output",
        "activations",
        "activations[features.0 (conv1_1)]",
        "activations[features.2 (conv1_2)]",
        "means",
    ]
    assert {k: suite.get(k) for k in ("tests", "failures", "skipped", "errors")} == {
        "tests": "5",
        "failures": "2",
        "skipped": "1",
        "errors": "0",
    }
    assert cases["output"].find("failure") is None and cases["output"].find("skipped") is None
    assert cases["activations[features.0 (conv1_1)]"].find("failure") is None  # within the tolerance
    failure = cases["activations[features.2 (conv1_2)]"].find("failure")
    assert failure is not None and "0.2" in failure.get("message") and "features.2 (conv1_2)" in failure.text
    assert cases["means"].find("skipped").get("message").endswith("no --data")
    # the test cases' ids (classname, name) are what CI systems track a test's history by: they stay those
    # the previous release wrote, whatever module writes them
    assert cases["activations"].get("classname") == "vggnorm.verify"
    assert cases["activations[features.2 (conv1_2)]"].get("classname") == "vggnorm.verify.activations"


def test_junit_names_layers_by_path_where_no_gatys_name_is_known():
    cases = [c.get("name") for c in junit(report(names={})).iter("testcase")]
    assert "activations[features.0]" in cases


@pytest.mark.parametrize("text", [NASTY, "new\nline\ttab", "ünïcödé ✓", "]]> --> <!--"])
def test_junit_escapes_any_text_and_reads_back_the_same(text):
    r = Report(f"dir/{text}.pth", "vgg11", [Check("output", "d", FAIL, 1.0, 0.1, text)])
    (suite,) = junit(r)
    assert suite.get("name") == f"vggnorm verify dir/{text}.pth"
    failure = suite.find("testcase/failure")
    assert failure.text == text and failure.get("message").endswith(text)


def test_junit_stays_well_formed_with_characters_xml_cannot_hold():
    """A checkpoint path or a detail may hold control characters (a file name may); XML 1.0 has no way to
    write them, so they must not reach the file raw: a CI's parser would reject the whole report."""
    r = Report("dir/a\x01b\x1b\udcff.pth", "vgg11", [Check("output", "d", FAIL, 1.0, 0.1, "bad \x1b[31mred\x00")])
    r.to_junit().encode()  # an undecodable file name's surrogate escape too: the file is written as UTF-8
    (suite,) = junit(r)
    assert "a" in suite.get("name") and "b" in suite.get("name")
    assert "red" in suite.find("testcase/failure").text


# ---- Markdown --------------------------------------------------------------------------------------------


def table_rows(md: str, header: str) -> list[list[str]]:
    """The cells of the table under ``## header``, split on unescaped pipes."""
    import re

    section = md.split(f"## {header}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def test_markdown_lists_the_inputs_and_a_row_per_check():
    inputs = {"original": "in.pth", "stats": ["a.h5", "b.h5"], "policy": {"mean": [0.5, 0.25], "crop": 224}}
    md = report(inputs=inputs).to_markdown()
    assert md.startswith("# vggnorm report: out.pth\n")
    assert "Architecture: `vgg11`. Result: **FAIL**." in md
    assert "- original: `in.pth`" in md and "- stats: `a.h5, b.h5`" in md
    assert "- policy:\n  - mean: `0.5, 0.25`\n  - crop: `224`" in md
    rows = table_rows(md, "Checks")
    assert [r[:2] for r in rows] == [
        ["output: outputs unchanged", PASS],
        ["activations: ReLU outputs divided", FAIL],
        ["means: re-measured means are 1", NOT_RUN],
    ]
    assert rows[1][2:] == ["0.2", "0.0001", ""] and rows[2][2:] == ["", "", "no --data"]


def test_a_markdown_row_keeps_its_five_cells_whatever_the_detail_holds():
    md = report([Check("output", "d", FAIL, 1.0, 0.1, "a | b\nc")]).to_markdown()
    (row,) = table_rows(md, "Checks")
    assert len(row) == 5 and "a" in row[4] and "b" in row[4] and "c" in row[4]


def test_markdown_names_layers_by_their_gatys_name_and_relu_name():
    r = report(
        measured=[{"layer": "features.0", "filters": 4, "live": 3, "min": 0.99, "median": 1.0, "max": 1.01}],
        layers=[
            {"conv": "features.2", "filters": 4, "min": 0.5, "median": 1.0, "max": 2.0, "dead": [3], "near_dead": []}
        ],
        figure="out.report.png",
    )
    md = r.to_markdown()
    assert table_rows(md, "Measured means per layer (live filters)") == [
        ["features.0 (relu1_1)", "4", "3", "0.99", "1", "1.01"]
    ]
    assert table_rows(md, "Scales per layer") == [["features.2 (conv1_2)", "4", "0.5", "1", "2", "1: 3", ""]]
    assert "![filter means before and after](out.report.png)" in md


# ---- summaries -------------------------------------------------------------------------------------------


def test_layer_summary_is_over_live_filters_and_lists_dead_and_near_dead_ones():
    scale = torch.tensor([4.0, 0.5, 1.0, 3.0, 0.3], dtype=torch.float64)  # filter 2 dead: scale 1
    (row,) = layer_summary({"features.0": LayerScales("features.0", scale, dead=[2], threshold=0.15)})
    assert (row["conv"], row["filters"], row["dead"], row["dead_threshold"]) == ("features.0", 5, [2], 0.15)
    live = scale[[0, 1, 3, 4]]
    assert (row["min"], row["median"], row["max"]) == (float(live.min()), float(live.median()), float(live.max()))
    # near-dead: live (the dead one is not, whatever its scale), and below 10 times the threshold; amplified 1/s
    assert row["near_dead"] == [
        {"filter": 1, "mean": 0.5, "amplification": 2.0},
        {"filter": 4, "mean": 0.3, "amplification": 1 / 0.3},
    ]


def test_measured_summary_takes_the_dead_list_or_else_the_rule():
    mean = torch.tensor([1.0, 0.98, 1.03, 0.0])
    (given,) = measured_summary({"features.1": mean}, {"features.1": [1]})
    assert (given["filters"], given["live"]) == (4, 3)
    assert (given["min"], given["max"]) == (0.0, pytest.approx(1.03))  # the listed dead one is left out, not 0
    (ruled,) = measured_summary({"features.1": mean}, None, rule=DeadRule())
    assert ruled["live"] == 3 and ruled["min"] == pytest.approx(0.98) and ruled["max"] == pytest.approx(1.03)


def test_a_layer_without_a_live_filter_has_no_numbers():
    (row,) = measured_summary({"f": torch.zeros(3)}, None)
    assert row["live"] == 0 and all(row[k] != row[k] for k in ("min", "median", "max"))  # NaN


# ---- files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["r", "r.json", "r.md"])
def test_report_paths_are_json_and_md_beside_the_path(tmp_path, given):
    assert report_paths(tmp_path / given) == (tmp_path / "r.json", tmp_path / "r.md")
    assert report_paths(tmp_path / "out.report") == (tmp_path / "out.report.json", tmp_path / "out.report.md")


def test_write_report_writes_both_files_and_never_overwrites_without_force(tmp_path):
    r = report()
    json_path, md_path = write_report(r, tmp_path / "r", force=False)
    assert json.loads(json_path.read_text()) == json.loads(r.to_json())
    assert md_path.read_text() == r.to_markdown()
    md_path.write_text("mine")
    json_path.unlink()
    with pytest.raises(OutputExistsError):
        write_report(r, tmp_path / "r", force=False)
    assert not json_path.exists() and md_path.read_text() == "mine"  # neither written
    write_report(r, tmp_path / "r", force=True)
    assert md_path.read_text() == r.to_markdown()
